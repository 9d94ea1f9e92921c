"""Jinja2 templates and static assets of the HTML reports (package data)."""
