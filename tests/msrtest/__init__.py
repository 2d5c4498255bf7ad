"""msrtest: the e2e test infrastructure of matrix-sync-router (real Synapse, Envoy and nginx on
127.0.0.1), installed editable by `just venv` (pyproject.toml). Modules by what they run:

- env: where things are (REPO, the filter's WASM, .e2e/), HOST and free_ports
- procs: the one process supervisor (spawn, Process, Service, Children for the bench), signal
  handling, stale-run cleanup, wait_until
- httpclient: the HTTP client (http_request, Response, bearer)
- matrix: Matrix vocabulary (SERVER_NAME, sync/whoami paths, FALLBACK_KEY, Device, AppService)
- synapse: one Synapse process whose extra listeners play the sync workers; its request log
- envoy: envoy.yaml rendering, Envoy (admin, access log), hot restart, health-check tuning
- stack: Stack = Synapse + Envoys in one .e2e/ folder (what the fixtures and the demo run)
- workers: the real worker topology (PostgreSQL, Redis, Synapse main + generic_workers)
- nginx: nginx + ngx_wasm_module running nginx-wasm/nginx.conf (render_nginx_config, Nginx)
- tap: HeaderTap, a relay recording the request heads a worker received
- faults: FaultWhoami, SlowWhoami, Relay (servers the tests break on purpose)
- load: concurrent sync load and its outcomes (SyncLoad, place_users, record_figures)
- proxyconf: offline checks of the nginx/Kong files (schema, path templates, check-config)
- spread: how many samples a "users spread over the workers" assertion needs
- runs: a command run at a terminal or piped, and what it left behind (test_lifecycle)
- fixtures: the pytest fixtures (tests/e2e/conftest.py loads them as a plugin)
- demo, validate: `just demo` and `just validate` (python -m msrtest.demo / msrtest.validate)
"""
