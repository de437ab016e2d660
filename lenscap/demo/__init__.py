"""A small world to run lenscap in without the internet: generated images on a loopback server."""
