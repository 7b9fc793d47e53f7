"""The web console: the registry and the live serving state in a browser, on the OpenAI HTTP
door's port under `/console/` (docs/console.md).

    app = create_app(backend, extra_routes=console_routes(ConsoleContext(...)))

| module | job |
|---|---|
| `app.py` | the routes: pages, forms (promote, roll back), JSON for the charts |
| `reads.py` | what each page reads from the registry and the engine (blocking) |
| `sessions.py` | sign-in sessions, CSRF tokens, the Origin check, security headers |
| `views.py` | registry records as pages show them (pure functions) |
| `lineage.py` | lineage as a graph, and its layered drawing |
| `live.py` | the per-adapter rolling window the Serving page draws, fed by engine hooks |
| `templates/`, `static/` | Jinja2 pages (autoescaped) and the one stylesheet and script |
"""
