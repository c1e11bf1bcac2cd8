"""The splitz HTTP service: validates requests and hands certification to a backend."""
