"""The manager's HTTP API by resource: one ``APIRouter`` module per resource, which
``api.create_app`` includes."""
