"""Thin routers: parse, validate, call `ServiceState.run`, shape the response."""

from service.routes import generate, health, images, models

ROUTERS = (health.router, images.router, generate.router, models.router)
