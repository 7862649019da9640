"""Thin routers: parse, validate, call `ServiceState.run`, shape the response."""

from service.routes import edits, generate, health, images, models

ROUTERS = (health.router, images.router, edits.router, generate.router, models.router)
