"""The six ZLayer daemons, one package each; they share only ``shared``."""
