"""wsserver.app: ``create_app`` layers defaults, ``WSSERVER_*`` variables and the ``config``
mapping; wires every part (Flask routes, ``/notify`` below Flask); starts no thread."""

from __future__ import annotations

import threading

import pytest

from wsserver import create_app
from wsserver.config import SettingsError, load_settings
from wsserver.notify import NotifyEndpoint


def test_overrides_beat_the_environment(monkeypatch):
    monkeypatch.setenv("WSSERVER_QUEUE_SIZE", "99")
    monkeypatch.setenv("WSSERVER_MAX_BODY_SIZE", "2048")
    app = create_app({"queue_size": 16})
    settings = app.config["WSSERVER_SETTINGS"]
    assert settings.queue_size == 16  # the mapping over the variable
    assert settings.max_body_size == 2048  # the variable over the default
    assert app.config["MAX_CONTENT_LENGTH"] == 2048  # Flask's own limit agrees


def test_a_settings_object_is_used_as_given(monkeypatch):
    settings = load_settings({"WSSERVER_ENV": "development"}, {"queue_size": 8})
    monkeypatch.setenv("WSSERVER_QUEUE_SIZE", "99")  # ignored: the object is complete
    app = create_app(settings)
    assert app.config["WSSERVER_SETTINGS"] is settings
    assert app.extensions["wsserver"].settings is settings


def test_an_unknown_or_bad_setting_is_refused():
    with pytest.raises(SettingsError, match="unknown setting"):
        create_app({"no_such_setting": 1})


def test_no_thread_is_started_and_the_service_waits_for_its_first_use():
    """Threads started here would start in gunicorn's master under --preload and not survive
    the fork (wsserver.service)."""
    before = set(threading.enumerate())
    app = create_app({"env": "development"})
    assert set(threading.enumerate()) == before
    service = app.extensions["wsserver"]
    assert service.broadcaster is None and service.flusher is None


def test_every_part_is_wired(client, app):
    assert isinstance(app.wsgi_app, NotifyEndpoint)
    endpoints = {rule.endpoint for rule in app.url_map.iter_rules()}
    assert {"api.health", "api.healthz", "api.readyz", "api.rooms", "websocket"} <= endpoints
    assert client.get("/").get_json()["service"] == "ws"
    assert client.options("/notify").headers["Allow"] == "POST, OPTIONS"
    missing = client.get("/nope")  # errors.init_app: JSON, not Flask's HTML page
    assert missing.status_code == 404 and missing.get_json()["code"] == "not_found"
