"""zlayer-apid: the REST API on port 3669: a gateway onto the bus."""
