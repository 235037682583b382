"""The web dashboard: `meshd up --web-listen HOST:PORT` (app.py serves the page in static/
and the node's op table as JSON; docs/web.md)."""
