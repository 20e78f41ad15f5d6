"""zlayerctl: the command-line front end.

It calls the daemons' bus interfaces directly on this host (the system bus
under systemd, the private bus of ``zlayerctl daemon run`` otherwise) and
turns every failure into one plain sentence and a non-zero exit.
"""
