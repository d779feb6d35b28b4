"""The request path: asyncio protocols on uvloop with httptools (llhttp) parsing both directions."""
