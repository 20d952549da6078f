"""marble's HTTP server: the OpenAI Images API, an A1111 API subset and a web UI (docs/server.md)."""
from marble.server.app import create_app
from marble.server.limits import ServerLimits
from marble.server.state import ServerConfig

__all__ = ["ServerConfig", "ServerLimits", "create_app"]
