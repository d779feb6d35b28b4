"""The admin API: an aiohttp application on its own (loopback) listener.

Design rule: the admin modules only translate HTTP to calls of proxy.changes, proxy.control and the
providers, through the typed AdminContext; none of them builds a route table or keeps state of its own.
"""
