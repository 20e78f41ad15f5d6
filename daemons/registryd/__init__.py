"""zlayer-registryd.

Images: registry pulls and pushes, the blob cache, unpacked layers,
import/export, builds.
"""
