"""marble's HTTP server: the OpenAI Images API, an A1111 API subset and a web UI (docs/server.md).

Build one with `marble.server.app.create_app(pipes, marble.server.state.ServerConfig(...))`. This
file imports nothing, so that importing a router (which imports state.py) never pulls in the app.
"""
