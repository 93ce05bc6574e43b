"""The admin API, one FastAPI router per resource; service/api.py includes them into the app mounted on the
service. Each route reaches the service instance through `service.deps.RefitDep`."""
