"""The CLI's command groups, one module each (registered by proxy.cli).

Design rule: an operator command talks to a running proxy only through its admin API (commands.client).
"""
