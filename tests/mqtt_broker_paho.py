"""Conformance checks of fieldgate's embedded MQTT broker with paho-mqtt 2.x, for one
protocol version (argv: host port version, version "3.1.1" or "5").

Each check prints "ok NAME" or raises; the script prints "ALL OK" at the end. Run by
tests/mqtt_broker.rs with the interpreter from $FIELDGATE_PYTHON.
"""

import sys
import threading
import time
import uuid

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

HOST, PORT, VERSION = sys.argv[1], int(sys.argv[2]), sys.argv[3]
V5 = VERSION == "5"
PROTOCOL = mqtt.MQTTv5 if V5 else mqtt.MQTTv311
WAIT = 10.0
PREFIX = "paho-" + VERSION.replace(".", "") + "-" + uuid.uuid4().hex[:6]


class Client:
    """A paho client that records what it receives."""

    def __init__(self, client_id, clean=True, will=None, expiry=None):
        self.messages = []
        self.lock = threading.Lock()
        self.connected = threading.Event()
        self.disconnected = threading.Event()
        self.disconnect_reason = None
        self.connack = None
        self.subacks = []
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=PROTOCOL,
            clean_session=None if V5 else clean,
        )
        self.client.on_message = self._on_message
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe
        if will:
            self.client.will_set(*will)
        props = None
        if V5 and expiry is not None:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = expiry
        kwargs = {"clean_start": clean, "properties": props} if V5 else {}
        self.client.connect(HOST, PORT, keepalive=30, **kwargs)
        self.client.loop_start()
        assert self.connected.wait(WAIT), "no CONNACK"

    def _on_connect(self, client, userdata, flags, reason, properties):
        self.connack = (flags.session_present, reason)
        self.connected.set()

    def _on_disconnect(self, client, userdata, flags, reason, properties):
        self.disconnect_reason = reason
        self.disconnected.set()

    def _on_subscribe(self, client, userdata, mid, reasons, properties):
        self.subacks.append(reasons)

    def _on_message(self, client, userdata, message):
        with self.lock:
            self.messages.append(message)

    def subscribe(self, topic, qos=1, options=None, props=None):
        count = len(self.subacks)
        if V5:
            self.client.subscribe(topic, options=options or SubscribeOptions(qos=qos), properties=props)
        else:
            self.client.subscribe(topic, qos)
        deadline = time.time() + WAIT
        while len(self.subacks) == count:
            assert time.time() < deadline, "no SUBACK for " + topic
            time.sleep(0.01)
        return self.subacks[-1]

    def publish(self, topic, payload, qos=1, retain=False, props=None):
        info = self.client.publish(topic, payload, qos=qos, retain=retain, properties=props)
        info.wait_for_publish(WAIT)
        return info

    def wait_for(self, count, topic=None):
        deadline = time.time() + WAIT
        while True:
            with self.lock:
                got = [m for m in self.messages if topic is None or m.topic == topic]
            if len(got) >= count:
                return got
            assert time.time() < deadline, "expected %d messages on %s, got %d" % (count, topic, len(got))
            time.sleep(0.01)

    def quiet(self, seconds=0.5):
        time.sleep(seconds)
        with self.lock:
            return list(self.messages)

    def stop(self):
        self.client.disconnect()
        self.client.loop_stop()

    def drop(self):
        """Closes the socket without DISCONNECT (an abnormal close: the will goes out)."""
        self.client.loop_stop()
        self.client.socket().close()


def ok(name):
    print("ok", name, flush=True)


# Wildcards (4.7): `+` and `#`, `$` topics not matched by a leading wildcard.
sub = Client(PREFIX + "-sub")
sub.subscribe(PREFIX + "/+/x", 1)
sub.subscribe("#", 0)
pub = Client(PREFIX + "-pub")
pub.publish(PREFIX + "/a/x", b"1", qos=1)
pub.publish("$" + PREFIX + "/hidden", b"2", qos=1)
got = sub.wait_for(1, PREFIX + "/a/x")
assert got[0].qos == 1, got[0].qos
assert all(not m.topic.startswith("$") for m in sub.quiet()), "a $ topic matched #"
ok("wildcards")

# Retained messages (3.3.1.3): kept, sent to a new subscriber with RETAIN, deleted by an
# empty payload.
pub.publish(PREFIX + "/ret", b"kept", qos=1, retain=True)
late = Client(PREFIX + "-late")
late.subscribe(PREFIX + "/ret", 1)
got = late.wait_for(1, PREFIX + "/ret")
assert got[0].retain and got[0].payload == b"kept"
pub.publish(PREFIX + "/ret", b"", qos=1, retain=True)
later = Client(PREFIX + "-later")
later.subscribe(PREFIX + "/ret", 1)
assert not later.quiet(), "a deleted retained message was sent"
late.stop()
later.stop()
ok("retained")

# Will (3.1.2.5): published on an abnormal close, not after DISCONNECT.
watcher = Client(PREFIX + "-watch")
watcher.subscribe(PREFIX + "/will", 1)
polite = Client(PREFIX + "-polite", will=(PREFIX + "/will", b"polite", 1, False))
polite.stop()
rude = Client(PREFIX + "-rude", will=(PREFIX + "/will", b"rude", 1, False))
rude.drop()
got = watcher.wait_for(1, PREFIX + "/will")
time.sleep(0.3)
payloads = [m.payload for m in watcher.quiet() if m.topic == PREFIX + "/will"]
assert payloads == [b"rude"], payloads
ok("will")

# Session takeover (3.1.4-3): a second CONNECT with the same client id closes the first.
first = Client(PREFIX + "-same")
second = Client(PREFIX + "-same")
assert first.disconnected.wait(WAIT), "the first connection was not closed"
if V5:
    assert first.disconnect_reason == 0x8E, first.disconnect_reason
first.client.loop_stop()
second.stop()
ok("takeover")

# Persistent session (4.1): QoS 1 messages queued while offline are delivered on resume.
keeper = Client(PREFIX + "-keep", clean=False, expiry=60)
keeper.subscribe(PREFIX + "/queued", 1)
keeper.stop()
pub.publish(PREFIX + "/queued", b"while-away", qos=1)
back = Client(PREFIX + "-keep", clean=False, expiry=60)
assert back.connack[0], "session not present"
got = back.wait_for(1, PREFIX + "/queued")
assert got[0].payload == b"while-away"
back.stop()
ok("persistent_session")

# QoS 2 exactly once, downgraded to the subscription's QoS.
q = Client(PREFIX + "-q")
q.subscribe(PREFIX + "/q2", 2)
q.subscribe(PREFIX + "/q0", 0)
pub.publish(PREFIX + "/q2", b"two", qos=2)
pub.publish(PREFIX + "/q0", b"zero", qos=2)
assert q.wait_for(1, PREFIX + "/q2")[0].qos == 2
assert q.wait_for(1, PREFIX + "/q0")[0].qos == 0
time.sleep(0.3)
assert len([m for m in q.quiet() if m.topic == PREFIX + "/q2"]) == 1
q.stop()
ok("qos2")

if V5:
    # Shared subscription (4.8.2): each message reaches one member.
    a = Client(PREFIX + "-sa")
    b = Client(PREFIX + "-sb")
    a.subscribe("$share/g/" + PREFIX + "/shared", 1)
    b.subscribe("$share/g/" + PREFIX + "/shared", 1)
    for i in range(10):
        pub.publish(PREFIX + "/shared", str(i).encode(), qos=1)
    deadline = time.time() + WAIT
    while len(a.quiet(0.05)) + len(b.quiet(0.05)) < 10:
        assert time.time() < deadline, "shared messages missing"
    time.sleep(0.3)
    assert len(a.quiet(0)) + len(b.quiet(0)) == 10, "a message reached both members"
    assert a.quiet(0) and b.quiet(0), "one member got nothing"
    a.stop()
    b.stop()
    ok("shared_subscription")

    # No local (3.8.3.1), subscription identifiers, user properties, response topic and
    # correlation data passed through, message expiry counted down.
    me = Client(PREFIX + "-me")
    me.subscribe(PREFIX + "/nl", options=SubscribeOptions(qos=1, noLocal=True))
    props = Properties(PacketTypes.SUBSCRIBE)
    props.SubscriptionIdentifier = 42
    other = Client(PREFIX + "-other")
    other.subscribe(PREFIX + "/rr", options=SubscribeOptions(qos=1), props=props)
    me.publish(PREFIX + "/nl", b"mine", qos=1)
    assert not me.quiet(), "no local delivered our own message"
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = PREFIX + "/reply"
    props.CorrelationData = b"corr-1"
    props.UserProperty = ("k", "v")
    props.MessageExpiryInterval = 60
    me.publish(PREFIX + "/rr", b"request", qos=1, props=props)
    got = other.wait_for(1, PREFIX + "/rr")[0].properties
    assert got.ResponseTopic == PREFIX + "/reply", got
    assert got.CorrelationData == b"corr-1", got
    assert ("k", "v") in got.UserProperty, got
    assert got.SubscriptionIdentifier == [42], got
    assert 0 < got.MessageExpiryInterval <= 60, got
    me.stop()
    other.stop()
    ok("v5_properties")

    # Topic alias (3.3.2.3.4): the alias stands for the topic after first use.
    alias_sub = Client(PREFIX + "-as")
    alias_sub.subscribe(PREFIX + "/alias", 1)
    aliaser = Client(PREFIX + "-al")
    props = Properties(PacketTypes.PUBLISH)
    props.TopicAlias = 1
    aliaser.publish(PREFIX + "/alias", b"first", qos=1, props=props)
    aliaser.publish("", b"second", qos=1, props=props)
    got = alias_sub.wait_for(2, PREFIX + "/alias")
    assert [m.payload for m in got] == [b"first", b"second"]
    aliaser.stop()
    alias_sub.stop()
    ok("topic_alias")

sub.stop()
pub.stop()
watcher.stop()
print("ALL OK", flush=True)
