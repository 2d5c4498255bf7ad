"""The e2e fixtures (one Synapse for the session, Envoys in front of it) live in the package, as a
pytest plugin other runs can load by name (`pytest -p msrtest.fixtures`)."""

pytest_plugins = ["msrtest.fixtures"]
