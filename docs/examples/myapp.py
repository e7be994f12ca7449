"""An existing Flask app with wsserver inside it (README.md, "Inside your own Flask app").

Served by the shipped worker and config, from this directory:
gunicorn -c python:wsserver.gunicorn_conf 'myapp:app'
"""

from flask import Flask, request

from wsserver import Realtime
from wsserver.exceptions import Refusal

app = Flask(__name__)
# /realtime/ws for browsers, /realtime/notify for other backends, /realtime/console...
rt = Realtime(app, url_prefix="/realtime")


@app.get("/")
def index():
    return {"app": "orders", "websocket": "/realtime/ws?rooms=orders"}


@app.post("/orders")
def create_order():
    order = request.get_json(silent=True) or {}
    order_id = order.get("id", 7)
    try:  # in-process: the same broker and delivery as POST /realtime/notify
        message_id = rt.publish(
            "order.created", f"Order {order_id}", {"id": order_id}, room="orders"
        )
    except Refusal as exc:  # what /notify would answer: 400 invalid_event, 503 queue_full...
        return {"ok": False, "code": exc.code, "error": exc.reason}, exc.status
    return {"ok": True, "id": message_id}
