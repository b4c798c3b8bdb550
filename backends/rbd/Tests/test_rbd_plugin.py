"""Speaks the plug-in protocol to vmsnap-backend-rbd against a live Ceph cluster and runs its plans
the way vmsnap does (native steps go back to the plug-in through `perform`).

Needs a cluster: scripts/ceph-cluster start, then CEPH_CONF (and CEPH_POOL, default vmsnap).
Run: python3 -m unittest discover -s backends/rbd/Tests -v
The test process itself needs no Ceph modules: whatever must happen behind the plug-in's back
(another client holding the image open, a clone, a snapshot made outside vmsnap) runs in
/usr/bin/python3, which has Debian's python3-rbd.
"""

import base64
import json
import os
import queue
import secrets
import signal
import stat
import subprocess
import tempfile
import threading
import time
import unittest

PLUGIN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "vmsnap-backend-rbd")
SYSTEM_PYTHON = "/usr/bin/python3"
TIMEOUT = 30  # seconds for every answer line
MiB = 1 << 20
CONF = os.environ.get("CEPH_CONF", "")
POOL = os.environ.get("CEPH_POOL", "vmsnap")

# Prelude for helper processes: a connected ioctx `io` on the pool, `rbd` imported.
HELPER = (
    "import os, sys, rados, rbd\n"
    "c = rados.Rados(conffile=os.environ['CEPH_CONF']); c.connect(timeout=10)\n"
    "io = c.open_ioctx(os.environ['CEPH_POOL'])\n"
)


class Plugin:
    """One running plug-in: send requests, read answers with a timeout; progress lines are kept apart."""

    def __init__(self, env=None):
        self.proc = subprocess.Popen([PLUGIN], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=env)
        self.lines = queue.Queue()
        self.next_id = 0
        self.progress = []
        self.stderr = []
        threading.Thread(target=self._pump, daemon=True).start()
        self.stderr_reader = threading.Thread(target=lambda: self.stderr.extend(self.proc.stderr), daemon=True)
        self.stderr_reader.start()

    def _pump(self):
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def send_raw(self, data):
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def answer(self):
        while True:
            try:
                line = self.lines.get(timeout=TIMEOUT)
            except queue.Empty:
                raise AssertionError(f"no answer within {TIMEOUT} s") from None
            if line is None:
                raise AssertionError("plug-in exited; stderr: " + b"".join(self.stderr[-20:]).decode(errors="replace"))
            reply = json.loads(line)
            if "progress" in reply:
                self.progress.append(reply)
                continue
            return reply

    def call(self, method, params=None):
        """Send one request; return the whole answer (checked for the same id)."""
        self.next_id += 1
        self.send_raw(json.dumps({"id": self.next_id, "method": method, "params": params or {}}).encode() + b"\n")
        reply = self.answer()
        assert reply["id"] == self.next_id, reply
        return reply

    def ok(self, method, params=None):
        reply = self.call(method, params)
        assert "result" in reply, f"{method} failed: {reply}"
        return reply["result"]

    def error(self, method, params=None):
        reply = self.call(method, params)
        assert "error" in reply, f"{method} should fail: {reply}"
        assert len(reply["error"]["message"]) >= 20, reply
        return reply["error"]

    def close(self):
        self.proc.stdin.close()
        rc = self.proc.wait(timeout=TIMEOUT)
        self.stderr_reader.join(timeout=TIMEOUT)
        self.proc.stdout.close()
        self.proc.stderr.close()
        return rc


def run_plan(p, plan):
    """Run a plan's steps as vmsnap's executor does: native steps through `perform`."""
    for step in plan["steps"]:
        action = step["action"]
        assert set(action) == {"backend"}, action
        assert all(isinstance(v, str) for v in action["backend"]["arguments"].values()), action
        p.ok("perform", action["backend"])
    return plan["result"]


def helper(code, *args, wait=True):
    """Run `code` after HELPER in Debian's python (it has the rbd module)."""
    env = dict(os.environ, CEPH_CONF=CONF, CEPH_POOL=POOL)
    argv = [SYSTEM_PYTHON, "-I", "-c", HELPER + code, *args]
    if wait:
        return subprocess.run(argv, env=env, check=True, timeout=60, capture_output=True, text=True).stdout
    return subprocess.Popen(argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


@unittest.skipUnless(CONF and os.path.isfile(CONF), "no Ceph cluster: run scripts/ceph-cluster start and export CEPH_CONF")
class RbdPluginTests(unittest.TestCase):
    def setUp(self):
        self.pool = {"directory": tempfile.gettempdir(), "options": {"pool": POOL}}
        self.p = Plugin()
        self.assertEqual(self.p.ok("hello", {"host": "vmsnap test", "apiVersion": 1, "apiAge": 0})["kind"], "rbd")
        self.p.ok("describe")
        self.p.ok("configure", {"settings": {"ceph-conf": CONF, "pool": POOL}})

    def tearDown(self):
        self.assertEqual(self.p.close(), 0)
        if not getattr(self, "malformed_requests", False):   # those log a traceback to stderr, as raw does
            errors = b"".join(self.p.stderr).decode(errors="replace")
            self.assertNotIn("Traceback", errors)   # every failure is a planned error answer

    def new_disk(self, size=16 * MiB):
        name = f"ut-{self._testMethodName[5:][:40]}-{secrets.token_hex(3)}"
        locator = self.p.ok("createDisk", {"name": name, "size": size, "pool": self.pool})["locator"]
        self.assertEqual(locator, f"{POOL}/{name}")
        layout = self.p.ok("adopt", {"locator": locator})
        self.addCleanup(self.destroy, locator)
        return locator, layout

    def destroy(self, locator):
        p = Plugin()
        try:
            p.ok("hello", {"host": "cleanup", "apiVersion": 1, "apiAge": 0})
            p.ok("configure", {"settings": {"ceph-conf": CONF}})
            layout = {"disk": {"id": locator, "kind": "rbd", "active": locator, "createdAt": 0},
                      "snapshots": [], "layers": []}
            adopted = p.call("adopt", {"locator": locator})   # its layers: the images set aside go too
            p.call("destroyDisk", {"layout": adopted.get("result", layout)})
        finally:
            p.close()

    def write(self, layout, offset, data):
        self.p.ok("write", {"bytes": base64.b64encode(data).decode(), "offset": offset, "layout": layout})

    def read(self, layout, view, offset, length):
        return base64.b64decode(self.p.ok("read", {"view": view, "offset": offset, "length": length, "layout": layout})["bytes"])

    def create(self, layout, name):
        plan = self.p.ok("planCreate", {"request": {"name": name, "kind": "internal"}, "layout": layout})
        return run_plan(self.p, plan), plan

    def inventory(self):
        return self.p.ok("poolInventory", {"pool": self.pool})["items"]

    # --- handshake and description ---------------------------------------------------------

    def test_executable_mode_and_interpreter(self):
        mode = os.stat(PLUGIN).st_mode
        self.assertTrue(mode & stat.S_IXUSR)
        self.assertFalse(mode & (stat.S_IWGRP | stat.S_IWOTH))
        with open(PLUGIN, "rb") as f:
            self.assertEqual(f.readline(), b"#!/usr/bin/python3 -I\n")

    def test_hello_version_ranges(self):
        err = self.p.error("hello", {"host": "vmsnap 9", "apiVersion": 5, "apiAge": 0})
        self.assertEqual(err["code"], "unsupported")
        self.assertIn("5..5", err["message"])
        self.assertIn("1..2", err["message"])
        self.assertEqual(self.p.ok("hello", {"host": "vmsnap 9", "apiVersion": 3, "apiAge": 2})["apiVersion"], 2)

    def test_describe(self):
        d = self.p.ok("describe")
        self.assertEqual((d["kind"], d["locators"], d["liveSnapshots"], d["driveFormat"], d["sourceType"]),
                         ("rbd", "name", "storage", "raw", "network"))
        cells = {(c["operation"], c["kind"], c["state"]) for c in d["capabilities"]["supported"]}
        for op in ("create", "list", "revert", "delete", "delete-subtree"):
            self.assertIn((op, "internal", "offline"), cells)
        for op in ("create", "list", "delete", "delete-subtree"):
            self.assertIn((op, "internal", "live"), cells)
        self.assertNotIn(("revert", "internal", "live"), cells)
        self.assertFalse(any(k == "external" for _, k, _ in cells))
        settings = {s["name"]: s for s in d["settings"]}
        self.assertEqual(set(settings), {"ceph-conf", "ceph-user", "pool", "revert-mode", "timeout", "lock-lease"})
        self.assertEqual(settings["revert-mode"]["choices"], ["rollback", "clone"])
        self.assertTrue(all(isinstance(s.get("default", ""), str) for s in d["settings"]))
        self.assertTrue(any("O(image size)" in n or "image size" in n for n in d["capabilities"]["notes"]))

    def test_configure_refuses_bad_values(self):
        for setting in ({"timeout": "0"}, {"timeout": "x"}, {"revert-mode": "copy"}, {"ceph-conf": "ceph.conf"},
                        {"ceph-user": "a b"}, {"pool": "a/b/c"}):
            self.assertEqual(self.p.error("configure", {"settings": setting})["code"], "invalidArgument", setting)
        self.assertEqual(self.p.ok("configure", {"settings": {"unknown": "x", "timeout": "5"}}), {})

    def test_unknown_method_and_bad_lines(self):
        self.malformed_requests = True
        self.assertEqual(self.p.error("frobnicate")["code"], "unsupported")
        self.p.send_raw(b"{this is not json\n")
        reply = self.p.answer()
        self.assertIsNone(reply["id"])
        self.assertEqual(reply["error"]["code"], "invalidArgument")
        self.p.send_raw(b"\xff\xfe\n")
        self.assertEqual(self.p.answer()["error"]["code"], "invalidArgument")
        self.assertEqual(self.p.error("planCreate", {"layout": 3})["code"], "invalidArgument")
        self.assertEqual(self.p.error("inspect", {"locator": "no-slash"})["code"], "invalidArgument")
        self.assertEqual(self.p.error("inspect", {"locator": "p/i@s"})["code"], "invalidArgument")
        self.assertEqual(self.p.error("perform", {"name": "format-disk", "arguments": {}})["code"], "unsupported")
        self.assertEqual(self.p.error("perform", {"name": "rollback", "arguments": {"image": "p/i"}})["code"],
                         "invalidArgument")
        self.assertEqual(self.p.ok("describe")["kind"], "rbd")  # still working

    # --- the snapshot cycle ----------------------------------------------------------------

    def test_create_revert_delete_cycle(self):
        disk, layout = self.new_disk()
        name = disk.split("/")[1]
        self.assertEqual(layout["disk"]["active"], disk)
        self.assertEqual(layout["layers"], [{"image": disk}])
        self.assertEqual(layout["snapshots"], [])
        self.assertEqual(self.p.ok("state", {"layout": layout}), {"state": "offline"})
        self.assertEqual(self.p.ok("recognizes", {"locator": disk}), {"recognized": True})
        self.assertEqual(self.p.ok("hypervisorDrive", {"layout": layout}),
                         {"path": f"rbd:{disk}:id=admin:conf={CONF}", "format": "raw", "sourceType": "network"})
        old = b"before snapshot " * 256
        self.write(layout, MiB, old)
        self.assertEqual(self.read(layout, {"active": True}, MiB, len(old)), old)

        plan = self.p.ok("planCreate", {"request": {"name": "s1", "kind": "internal", "description": "first"},
                                        "layout": layout})
        self.assertEqual(plan["pointOfNoReturn"], 1)
        self.assertEqual(len(plan["steps"]), 1)
        step = plan["steps"][0]
        self.assertEqual(step["action"]["backend"], {"name": "snap-create", "arguments": {"image": disk, "snapshot": "s1"}})
        self.assertEqual(step["undo"]["backend"]["name"], "snap-remove")
        self.assertNotIn(f"{name}@s1", self.inventory())   # planning changed nothing
        layout = run_plan(self.p, plan)
        self.p.ok("perform", step["action"]["backend"])   # a step runs twice after a crash: still fine
        self.assertIn(f"{name}@s1", self.inventory())
        s1 = layout["snapshots"][0]
        self.assertEqual((s1["name"], s1["kind"], s1["description"], s1["virtualSize"], s1["image"]),
                         ("s1", "internal", "first", 16 * MiB, disk))
        self.assertEqual(layout["disk"]["current"], "s1")
        self.assertEqual(self.p.ok("rollbackBlockers", {"snapshot": "s1", "layout": layout}), {"blockers": []})

        again = self.p.ok("planCreate", {"request": {"name": "s1", "kind": "internal"}, "layout": layout})
        self.assertEqual(again["steps"], [])
        self.assertEqual(again["result"], layout)
        self.assertEqual(self.p.error("planCreate", {"request": {"name": "s2", "kind": "external"},
                                                     "layout": layout})["code"], "unsupported")

        new = b"after snapshot!! " * 256
        self.write(layout, MiB, new)
        self.assertEqual(self.read(layout, {"snapshot": "s1"}, MiB, len(old)), old)
        self.assertEqual(self.read(layout, {"active": True}, MiB, len(new)), new)
        blockers = self.p.ok("rollbackBlockers", {"snapshot": "s1", "layout": layout})["blockers"]
        self.assertEqual([(b["kind"], b["blocking"]) for b in blockers], [("unsaved-changes", False)])

        layout, _ = self.create(layout, "s2")
        self.assertEqual(layout["snapshots"][1]["parent"], "s1")
        info = self.p.ok("inspect", {"locator": disk})
        self.assertEqual((info["format"], info["virtualSize"]), ("rbd", 16 * MiB))
        self.assertEqual([s["name"] for s in info["snapshots"]], ["s1", "s2"])
        self.assertTrue(all(abs(s["createdAt"] - time.time()) < 600 for s in info["snapshots"]))

        revert = self.p.ok("planRevert", {"snapshot": "s1", "layout": layout})
        self.assertEqual(revert["pointOfNoReturn"], 0)
        self.assertEqual([s["action"]["backend"]["name"] for s in revert["steps"]], ["rollback"])
        layout = run_plan(self.p, revert)
        run_plan(self.p, revert)   # re-running a rollback is fine
        self.assertEqual(layout["disk"]["current"], "s1")
        self.assertEqual(self.read(layout, {"active": True}, MiB, len(old)), old)
        self.assertEqual(self.read(layout, {"snapshot": "s2"}, MiB, len(new)), new)   # newer snapshot kept
        self.assertEqual(self.p.error("planRevert", {"snapshot": "nope", "layout": layout})["code"], "notFound")

        delete = self.p.ok("planDelete", {"snapshot": "s1", "mode": "merge", "layout": layout})
        self.assertEqual(delete["pointOfNoReturn"], 0)
        layout = run_plan(self.p, delete)
        run_plan(self.p, delete)   # idempotent: the snapshot is gone, the step is done
        self.assertEqual([s["name"] for s in layout["snapshots"]], ["s2"])
        self.assertNotIn("parent", layout["snapshots"][0])
        self.assertNotIn("current", layout["disk"])
        self.assertEqual(self.read(layout, {"snapshot": "s2"}, MiB, len(new)), new)
        self.assertEqual(self.read(layout, {"active": True}, MiB, len(old)), old)
        self.assertEqual(self.p.ok("verify", {"layout": layout}), {"problems": []})
        self.assertEqual(sorted(i for i in self.inventory() if i.startswith(name)), [name, f"{name}@s2"])

        self.p.ok("destroyDisk", {"layout": layout})
        self.p.ok("destroyDisk", {"layout": layout})   # done if gone
        self.assertFalse(any(i.startswith(name) for i in self.inventory()))

    def test_a_locked_operation_sees_what_its_own_steps_changed(self):
        # Under the cluster lock the plug-in keeps one handle from the state call on, through the
        # steps: a step that changes the image must not leave a later call reading it as it was,
        # nor seeing its own handle (a watcher, the exclusive lock after a write) as another user.
        disk, before = self.new_disk(MiB)
        self.p.ok("lockShared", {"disk": disk, "holder": "unit test", "wait": 5})
        self.assertEqual(self.p.ok("state", {"layout": before}), {"state": "offline"})
        after, _ = self.create(before, "k1")
        err = self.p.error("planCreate", {"request": {"name": "k1", "kind": "internal"}, "layout": before})
        self.assertEqual(err["code"], "alreadyExists", err)
        revert = self.p.ok("planRevert", {"snapshot": "k1", "layout": after})
        self.assertEqual([s["action"]["backend"]["name"] for s in revert["steps"]], ["rollback"])
        # Released, then changed by another client: the next lock's calls see that too.
        self.p.ok("unlockShared", {"disk": disk})
        helper("img = rbd.Image(io, sys.argv[1]); img.create_snap('k2'); img.close()\n", disk.split("/")[1])
        self.p.ok("lockShared", {"disk": disk, "holder": "unit test", "wait": 5})
        err = self.p.error("planCreate", {"request": {"name": "k2", "kind": "internal"}, "layout": after})
        self.assertEqual(err["code"], "alreadyExists", err)

    def test_a_locked_clone_swap_leaves_no_handle_on_the_image_set_aside(self):
        # The step opens the disk before it renames it aside: a handle kept from there would make
        # the calls after it read the image set aside instead of the clone now under the name.
        disk, layout = self.new_disk(MiB)
        layout, _ = self.create(layout, "c1")
        self.p.ok("configure", {"settings": {"revert-mode": "clone"}})
        self.p.ok("lockShared", {"disk": disk, "holder": "unit test", "wait": 5})
        self.assertEqual(self.p.ok("state", {"layout": layout}), {"state": "offline"})
        layout = run_plan(self.p, self.p.ok("planRevert", {"snapshot": "c1", "layout": layout}))
        info = self.p.ok("inspect", {"locator": disk})
        self.assertEqual(info["snapshots"], [], info)
        self.assertEqual(len(info["backingChain"]), 1, info)

    def test_a_replayed_rollback_does_not_roll_back_again(self):
        # A journal replayed from a record one write behind (another host's) names the rollback
        # it already ran: the last rollback's operation id is remembered and the replay skips it.
        # Under the disk's cluster lock (as vmsnap runs it) the id is an xattr of the disk's shared
        # record; without the lock, the image's metadata.
        for locked in (False, True):
            with self.subTest(locked=locked):
                disk, layout = self.new_disk()
                if locked:
                    self.p.ok("lockShared", {"disk": disk, "holder": "unit test", "wait": 5})
                layout = run_plan(self.p, self.p.ok("planCreate", {"request": {"name": "s1", "kind": "internal"},
                                                                   "layout": layout}))
                plan = self.p.ok("planRevert", {"snapshot": "s1", "layout": layout})
                step = plan["steps"][0]["action"]["backend"]
                self.assertRegex(step["arguments"].get("op", ""), r"^[0-9a-f]{32}$")
                self.p.ok("perform", step)
                later = b"written after the revert " * 64
                self.write(layout, 0, later)
                self.p.ok("perform", step)   # the replay
                self.assertEqual(self.read(layout, {"active": True}, 0, len(later)), later)
                kept = helper("name = sys.argv[1]\n"
                              "try: print(io.get_xattr('vmsnap_disk.' + name, 'vmsnap.last-rollback').decode())\n"
                              "except (rados.NoData, rados.ObjectNotFound): print('-')\n"
                              "with rbd.Image(io, name, read_only=True) as img:\n"
                              "    print(dict(img.metadata_list()).get('vmsnap.last-rollback', '-'))\n",
                              disk.split("/", 1)[1]).split()
                op = step["arguments"]["op"]
                self.assertEqual(kept, [op, "-"] if locked else ["-", op])
                again = self.p.ok("planRevert", {"snapshot": "s1", "layout": layout})["steps"][0]["action"]["backend"]
                self.assertNotEqual(again["arguments"]["op"], op)
                self.p.ok("perform", again)   # a new revert does roll back
                self.assertEqual(self.read(layout, {"active": True}, 0, len(later)), bytes(len(later)))

    def test_a_rollback_run_without_the_lock_is_not_replayed_under_it(self):
        # A plug-in restarted after a call timeout holds no lock, so the rollback it runs is
        # remembered in the image's metadata while the record's xattr still names an older one:
        # a replay under the lock must find it there.
        disk, layout = self.new_disk()
        layout = run_plan(self.p, self.p.ok("planCreate", {"request": {"name": "s1", "kind": "internal"},
                                                           "layout": layout}))
        self.p.ok("lockShared", {"disk": disk, "holder": "unit test", "wait": 5})
        first = self.p.ok("planRevert", {"snapshot": "s1", "layout": layout})["steps"][0]["action"]["backend"]
        self.p.ok("perform", first)   # under the lock: the record's xattr names it
        second = self.p.ok("planRevert", {"snapshot": "s1", "layout": layout})["steps"][0]["action"]["backend"]
        self.p.ok("unlockShared", {"disk": disk})
        self.p.ok("perform", second)   # without the lock: the image's metadata names it
        later = b"written after the second revert " * 64
        self.write(layout, 0, later)
        self.p.ok("lockShared", {"disk": disk, "holder": "unit test", "wait": 5})
        self.p.ok("perform", second)   # the replay, under the lock
        self.assertEqual(self.read(layout, {"active": True}, 0, len(later)), later)

    def test_a_stalled_plugin_acts_on_nothing_after_its_lease(self):
        # The plug-in holds a disk's lock with a 3 s lease, then stalls (SIGSTOP) past it while
        # another client takes the lock. Woken, it must refuse to write the record or run a step,
        # whether or not its renewal thread has noticed yet.
        disk, _ = self.new_disk()
        self.p.ok("configure", {"settings": {"ceph-conf": CONF, "lock-lease": "3"}})
        self.assertLess(self.p.ok("lockShared", {"disk": disk, "holder": "host A (test)", "wait": 5})["waited"], 1)
        self.p.ok("writeShared", {"disk": disk, "document": "{}"})
        os.kill(self.p.proc.pid, signal.SIGSTOP)
        try:
            helper("obj = 'vmsnap_disk.' + sys.argv[1]\n"
                   "import time\n"
                   "for _ in range(100):\n"
                   "    try:\n"
                   "        io.lock_exclusive(obj, 'vmsnap', 'other', 'host C', 5, 0); break\n"
                   "    except rados.ObjectBusy: time.sleep(0.2)\n"
                   "else: sys.exit('never got the lock')\n", disk.split("/", 1)[1])
        finally:
            os.kill(self.p.proc.pid, signal.SIGCONT)
        err = self.p.error("writeShared", {"disk": disk, "document": "{\"late\": true}"})
        self.assertEqual(err["code"], "conflict")
        err = self.p.error("perform", {"name": "snap-create", "arguments": {"image": disk, "snapshot": "late"}})
        self.assertEqual(err["code"], "conflict")
        self.assertEqual(self.p.ok("readShared", {"disk": disk})["document"], "{}")
        self.p.ok("unlockShared", {"disk": disk})   # host C's lease runs out by itself

    def test_delete_modes(self):
        disk, layout = self.new_disk(MiB)
        for name in ("a", "b", "c"):   # a <- b <- c
            layout, _ = self.create(layout, name)
        only = self.p.ok("planDelete", {"snapshot": "c", "mode": "children-only", "layout": layout})
        self.assertEqual((only["steps"], only["result"]), ([], layout))
        sub = self.p.ok("planDelete", {"snapshot": "b", "mode": "children-only", "layout": layout})
        self.assertEqual([s["name"] for s in sub["result"]["snapshots"]], ["a", "b"])
        self.assertEqual(sub["result"]["disk"]["current"], "b")
        tree = self.p.ok("planDelete", {"snapshot": "a", "mode": "children", "layout": layout})
        self.assertEqual(len(tree["steps"]), 3)
        self.assertEqual(tree["result"]["snapshots"], [])
        self.assertNotIn("current", tree["result"]["disk"])
        layout = run_plan(self.p, tree)
        self.assertEqual(self.p.ok("inspect", {"locator": disk})["snapshots"], [])
        self.assertEqual(self.p.error("planDelete", {"snapshot": "a", "mode": "merge", "layout": layout})["code"],
                         "notFound")

    def test_names(self):
        disk, layout = self.new_disk(MiB)
        for name in ("a b", "été", "x@y", "n" * 255):
            layout, _ = self.create(layout, name)
        self.assertEqual(self.p.ok("verify", {"layout": layout}), {"problems": []})
        for bad in ("", "a/b", "-rf", "tab\there", "n" * 256):
            err = self.p.error("planCreate", {"request": {"name": bad, "kind": "internal"}, "layout": layout})
            self.assertEqual(err["code"], "invalidName", bad)

    # --- the cluster's view ----------------------------------------------------------------

    def test_missing_image_and_pool(self):
        gone = f"{POOL}/ut-missing-{secrets.token_hex(3)}"
        layout = {"disk": {"id": gone, "kind": "rbd", "active": gone, "createdAt": 0}, "snapshots": [], "layers": []}
        for method, params in (("inspect", {"locator": gone}), ("adopt", {"locator": gone}),
                               ("state", {"layout": layout}),
                               ("planCreate", {"request": {"name": "s", "kind": "internal"}, "layout": layout}),
                               ("read", {"view": {"active": True}, "offset": 0, "length": 1, "layout": layout})):
            err = self.p.error(method, params)
            self.assertEqual(err["code"], "notFound", (method, err))
            self.assertIn(gone, err["message"])
        self.assertEqual(self.p.ok("recognizes", {"locator": gone}), {"recognized": False})
        self.assertEqual(self.p.ok("recognizes", {"locator": "/etc/hostname"}), {"recognized": False})
        self.assertEqual(self.p.ok("verify", {"layout": layout}), {"problems": [f"RBD image {gone} is missing"]})
        err = self.p.error("inspect", {"locator": "no-such-pool-xyz/img"})
        self.assertEqual(err["code"], "notFound")
        self.assertIn("no-such-pool-xyz", err["message"])
        err = self.p.error("createDisk", {"name": "x", "size": MiB, "pool": {"directory": "/tmp", "options": {"pool": "no-such-pool-xyz"}}})
        self.assertEqual(err["code"], "notFound")
        disk, _ = self.new_disk(MiB)
        self.assertEqual(self.p.error("createDisk", {"name": disk.split("/")[1], "size": MiB, "pool": self.pool})["code"],
                         "alreadyExists")

    def test_cluster_down_is_an_io_error_within_the_timeout(self):
        with tempfile.TemporaryDirectory() as d:
            conf = os.path.join(d, "ceph.conf")
            keyring = os.path.join(os.path.dirname(CONF), "ceph.client.admin.keyring")
            with open(conf, "w") as f:
                f.write(f"[global]\nmon host = 127.0.0.1:1\nkeyring = {keyring}\nlog file = /dev/null\n")
            self.p.ok("configure", {"settings": {"ceph-conf": conf, "timeout": "2"}})
            start = time.monotonic()
            err = self.p.error("inspect", {"locator": f"{POOL}/anything"})
            took = time.monotonic() - start
            self.assertEqual(err["code"], "io", err)
            self.assertIn(conf, err["message"])
            self.assertIn("is the cluster up?", err["message"])
            # Under the default (10 s) either way; the margin is for a loaded CI machine.
            self.assertLess(took, 9, f"took {took:.1f} s with timeout=2")
            self.assertEqual(self.p.ok("recognizes", {"locator": f"{POOL}/anything"}), {"recognized": False})
            missing = os.path.join(d, "missing.conf")
            self.p.ok("configure", {"settings": {"ceph-conf": missing}})
            err = self.p.error("inspect", {"locator": f"{POOL}/anything"})
            self.assertEqual(err["code"], "io")
            self.assertIn(missing, err["message"])

    def test_ceph_conf_from_environment_and_unknown_user(self):
        disk, layout = self.new_disk(MiB)
        p = Plugin(env=dict(os.environ, CEPH_CONF=CONF))   # no ceph-conf setting: $CEPH_CONF
        try:
            p.ok("hello", {"host": "t", "apiVersion": 1, "apiAge": 0})
            self.assertEqual(p.ok("state", {"layout": layout}), {"state": "offline"})
            p.ok("configure", {"settings": {"ceph-user": "nobody", "timeout": "3"}})   # reconnects
            err = p.error("state", {"layout": layout})
            self.assertIn(err["code"], ("io", "commandFailed"))
            self.assertIn("client.nobody", err["message"])
        finally:
            self.assertEqual(p.close(), 0)

    def test_in_use_image_refuses_revert(self):
        disk, layout = self.new_disk(MiB)
        layout, _ = self.create(layout, "s1")
        # A client that keeps the image open read-write (as QEMU does) until its stdin closes. It
        # closes the image itself: a killed client's watch stays for osd_client_watch_timeout (30 s).
        holder = helper("img = rbd.Image(io, sys.argv[1])\nprint('open', flush=True)\nsys.stdin.read()\n"
                        "img.close()\n", disk.split("/")[1], wait=False)
        self.addCleanup(lambda: (holder.kill(), holder.wait(), holder.stdout.close()))
        self.assertEqual(holder.stdout.readline().strip(), "open")
        self.assertEqual(self.p.ok("state", {"layout": layout}), {"state": "live"})
        err = self.p.error("planRevert", {"snapshot": "s1", "layout": layout})
        self.assertEqual(err["code"], "inUse")
        blockers = self.p.ok("rollbackBlockers", {"snapshot": "s1", "layout": layout})["blockers"]
        self.assertIn(("in-use", True), [(b["kind"], b["blocking"]) for b in blockers])
        err = self.p.error("perform", {"name": "rollback", "arguments": {"image": disk, "snapshot": "s1"}})
        self.assertEqual(err["code"], "inUse")
        # live create and delete are the storage's job: they work while the image is open
        layout, _ = self.create(layout, "s2")
        layout = run_plan(self.p, self.p.ok("planDelete", {"snapshot": "s2", "mode": "merge", "layout": layout}))
        holder.stdin.close()
        self.assertEqual(holder.wait(timeout=30), 0)
        self.assertEqual(self.p.ok("state", {"layout": layout}), {"state": "offline"})
        self.assertEqual(len(self.p.ok("planRevert", {"snapshot": "s1", "layout": layout})["steps"]), 1)

    def test_clones_block_delete(self):
        disk, layout = self.new_disk(MiB)
        layout, _ = self.create(layout, "base")
        image = disk.split("/")[1]
        clone = image + "-clone"
        helper("img = rbd.Image(io, sys.argv[1]); img.protect_snap('base'); img.close()\n"
               "rbd.RBD().clone(io, sys.argv[1], 'base', io, sys.argv[2], features=rbd.RBD_FEATURE_LAYERING)\n",
               image, clone)
        self.addCleanup(helper, "rbd.RBD().remove(io, sys.argv[1])\n"
                                "img = rbd.Image(io, sys.argv[2]); img.unprotect_snap('base'); img.close()\n", clone, image)
        err = self.p.error("planDelete", {"snapshot": "base", "mode": "merge", "layout": layout})
        self.assertEqual(err["code"], "conflict")
        self.assertIn(clone, err["message"])
        err = self.p.error("perform", {"name": "snap-remove", "arguments": {"image": disk, "snapshot": "base"}})
        self.assertEqual(err["code"], "conflict")
        self.assertEqual(self.p.error("destroyDisk", {"layout": layout})["code"], "conflict")
        self.assertIn(f"{image}@base", self.inventory())
        # a rollback does not touch clones: no blocker
        self.assertEqual(self.p.ok("rollbackBlockers", {"snapshot": "base", "layout": layout})["blockers"], [])
        # Under the disk's lock the clones are listed through the kept handle (moved to the
        # snapshot and back): the same refusals, and the handle reads the image again after.
        self.p.ok("lockShared", {"disk": disk, "holder": "unit test", "wait": 5})
        self.assertEqual(self.p.ok("state", {"layout": layout}), {"state": "offline"})
        err = self.p.error("planDelete", {"snapshot": "base", "mode": "merge", "layout": layout})
        self.assertEqual(err["code"], "conflict")
        self.assertIn(clone, err["message"])
        err = self.p.error("perform", {"name": "snap-remove", "arguments": {"image": disk, "snapshot": "base"}})
        self.assertEqual(err["code"], "conflict")
        self.assertIn(clone, err["message"])
        after, _ = self.create(layout, "next")   # a write through a handle at a snapshot would fail
        self.assertEqual(after["disk"]["current"], "next")
        self.assertIn(f"{image}@next", self.inventory())

    def test_snapshots_made_outside_vmsnap(self):
        disk, layout = self.new_disk(MiB)
        image = disk.split("/")[1]
        self.write(layout, 0, b"one" * 100)
        helper("img = rbd.Image(io, sys.argv[1]); img.create_snap('outside1'); img.create_snap('outside2'); img.close()\n",
               image)
        adopted = self.p.ok("adopt", {"locator": disk})
        self.assertEqual([(s["name"], s.get("parent")) for s in adopted["snapshots"]],
                         [("outside1", None), ("outside2", "outside1")])
        self.assertTrue(all(s["kind"] == "internal" and s["backendID"].isdigit() for s in adopted["snapshots"]))
        self.assertEqual(adopted["disk"]["current"], "outside2")
        self.assertEqual(self.read(adopted, {"snapshot": "outside1"}, 0, 300), b"one" * 100)
        # the layout from before knows none of them
        err = self.p.error("planCreate", {"request": {"name": "outside1", "kind": "internal"}, "layout": layout})
        self.assertEqual(err["code"], "alreadyExists")
        problems = self.p.ok("verify", {"layout": layout})["problems"]
        self.assertEqual(len(problems), 2)
        self.assertTrue(all("not listed by vmsnap" in x for x in problems), problems)
        # deleted outside vmsnap: revert says so, verify reports it
        helper("img = rbd.Image(io, sys.argv[1]); img.remove_snap('outside1'); img.close()\n", image)
        err = self.p.error("planRevert", {"snapshot": "outside1", "layout": adopted})
        self.assertEqual(err["code"], "notFound")
        self.assertIn("deleted outside vmsnap", err["message"])
        self.assertIn("missing", " ".join(self.p.ok("verify", {"layout": adopted})["problems"]))
        # made again under the same name: the recorded id no longer matches
        helper("img = rbd.Image(io, sys.argv[1]); img.create_snap('outside1'); img.close()\n", image)
        self.assertEqual(self.p.error("planRevert", {"snapshot": "outside1", "layout": adopted})["code"], "conflict")
        self.assertEqual(self.p.error("planDelete", {"snapshot": "outside1", "mode": "merge", "layout": adopted})["code"],
                         "conflict")

    def test_revert_mode_clone_swaps_in_a_clone(self):
        disk, layout = self.new_disk(4 * MiB)
        a, b, c, d = (bytes([n]) * 4096 for n in (1, 2, 3, 4))
        self.write(layout, 0, a)
        layout, _ = self.create(layout, "s1")
        self.write(layout, 0, b)
        layout, _ = self.create(layout, "s2")
        self.write(layout, 0, c)
        self.p.ok("configure", {"settings": {"revert-mode": "clone"}})
        plan = self.p.ok("planRevert", {"snapshot": "s1", "layout": layout})
        self.assertEqual([s["action"]["backend"]["name"] for s in plan["steps"]], ["protect", "clone-swap"])
        self.assertEqual(plan["pointOfNoReturn"], 1)
        step = plan["steps"][1]["action"]["backend"]
        layout = run_plan(self.p, plan)
        self.p.ok("perform", step)   # a step runs twice after a crash: still fine
        frozen = step["arguments"]["frozen"]
        self.assertTrue(frozen.startswith(disk + ".vmsnap-"), frozen)
        self.assertEqual(layout["layers"][0], {"image": disk, "backing": frozen})
        self.assertEqual({s["name"]: s["image"] for s in layout["snapshots"]}, {"s1": frozen, "s2": frozen})
        self.assertEqual(layout["disk"]["current"], "s1")
        self.assertEqual(self.read(layout, {"active": True}, 0, 4096), a)
        self.assertEqual(self.read(layout, {"snapshot": "s2"}, 0, 4096), b)
        self.assertEqual(self.p.ok("verify", {"layout": layout})["problems"], [])
        # Another host, new to the disk, knows the image set aside as the disk's own.
        adopted = self.p.ok("adopt", {"locator": disk})
        self.assertIn({"image": frozen}, adopted["layers"])

        # Again, while the active image holds no snapshot: it is not kept.
        plan = self.p.ok("planRevert", {"snapshot": "s2", "layout": layout})
        # It goes to the RBD trash (one request), not removed (a request per object written).
        self.assertEqual([s["action"]["backend"]["name"] for s in plan["steps"]],
                         ["protect", "clone-swap", "trash-image"])
        swapped = plan["steps"][1]["action"]["backend"]["arguments"]["frozen"]
        layout = run_plan(self.p, plan)
        self.p.ok("perform", plan["steps"][2]["action"]["backend"])   # again after a crash: done
        self.assertEqual(layout["layers"], [{"image": disk, "backing": frozen}, {"image": frozen}])
        self.assertEqual(self.read(layout, {"active": True}, 0, 4096), b)
        name = disk.split("/", 1)[1]
        set_aside = [i for i in self.inventory() if i.startswith(name + ".vmsnap-") and "@" not in i]
        in_pool = [i for i in set_aside if "(in the trash" not in i]
        in_trash = [i for i in set_aside if "(in the trash" in i]
        self.assertEqual(in_pool, [frozen.split("/", 1)[1]], set_aside)
        self.assertEqual(len(in_trash), 1, set_aside)
        self.assertTrue(in_trash[0].startswith(swapped.split("/", 1)[1] + " (in the trash, id "), set_aside)
        self.assertEqual(self.p.ok("verify", {"layout": layout})["problems"], [])
        # A trashed clone keeps its parent snapshot (frozen@s1) held: `maintain` removes it for
        # good, and a delete would remove it first (below: a second swapped clone).
        self.assertEqual(self.p.ok("maintain", {"layout": layout})["actions"],
                         [f"removed {swapped} from the RBD trash (set aside by a clone-swap revert)"])
        self.assertNotIn("trash", " ".join(i for i in self.inventory() if i.startswith(name)))
        self.assertEqual(self.p.ok("maintain", {"layout": layout})["actions"], [])
        plan = self.p.ok("planRevert", {"snapshot": "s1", "layout": layout})
        layout = run_plan(self.p, plan)
        self.assertEqual(self.read(layout, {"active": True}, 0, 4096), a)
        plan = self.p.ok("planRevert", {"snapshot": "s2", "layout": layout})
        layout = run_plan(self.p, plan)
        self.assertEqual(self.read(layout, {"active": True}, 0, 4096), b)
        self.assertEqual(len([i for i in self.inventory() if i.startswith(name) and "(in the trash" in i]), 2)   # clones of s2, s1

        self.write(layout, 0, d)
        layout, _ = self.create(layout, "s3")
        self.assertEqual([s for s in layout["snapshots"] if s["name"] == "s3"][0]["image"], disk)
        self.p.ok("configure", {"settings": {"revert-mode": "rollback"}})
        err = self.p.error("planRevert", {"snapshot": "s2", "layout": layout})
        self.assertEqual(err["code"], "unsupported")
        self.assertIn("revert-mode=clone", err["message"])

        # Deleting s1 (nothing cloned from it now) removes it; deleting s2 flattens the clone that
        # depends on it and then empties the frozen image.
        # (s1 is held by a clone in the trash: the delete removes the disk's trashed images first.)
        plan = self.p.ok("planDelete", {"snapshot": "s1", "mode": "merge", "layout": layout})
        self.assertEqual([s["action"]["backend"]["name"] for s in plan["steps"]],
                         ["purge-trash", "purge-trash", "unprotect-unused", "snap-remove"])
        layout = run_plan(self.p, plan)
        self.assertNotIn("trash", " ".join(i for i in self.inventory() if i.startswith(name)))
        self.assertEqual(self.read(layout, {"snapshot": "s2"}, 0, 4096), b)
        self.assertIn(frozen.split("/", 1)[1], self.inventory())
        plan = self.p.ok("planDelete", {"snapshot": "s2", "mode": "merge", "layout": layout})
        self.assertEqual([s["action"]["backend"]["name"] for s in plan["steps"]],
                         ["flatten", "unprotect-unused", "snap-remove", "remove-image"])
        layout = run_plan(self.p, plan)
        self.assertEqual(layout["layers"], [{"image": disk}])
        self.assertNotIn(frozen.split("/", 1)[1], self.inventory())
        self.assertEqual(self.p.ok("verify", {"layout": layout})["problems"], [])
        self.assertEqual(self.read(layout, {"active": True}, 0, 4096), d)

    def test_destroy_removes_what_clone_swaps_left_in_the_trash(self):
        disk, layout = self.new_disk(4 * MiB)
        self.write(layout, 0, b"\1" * 4096)
        layout, _ = self.create(layout, "s1")
        self.p.ok("configure", {"settings": {"revert-mode": "clone"}})
        for _ in range(2):   # the second revert moves the first one's clone (no snapshots) to the trash
            layout = run_plan(self.p, self.p.ok("planRevert", {"snapshot": "s1", "layout": layout}))
        name = disk.split("/", 1)[1]
        ours = lambda: [i for i in self.inventory() if i.startswith(name)]
        self.assertEqual(len([i for i in ours() if "(in the trash, id " in i]), 1, ours())
        # An image named like a set-aside one but moved to the trash by someone else stays there.
        helper("rbd.RBD().create(io, sys.argv[1], 1 << 20); rbd.RBD().trash_move(io, sys.argv[1], 0)",
               name + ".vmsnap-0therone")
        self.p.ok("destroyDisk", {"layout": layout})
        left = ours()
        self.assertEqual(len(left), 1, left)
        self.assertTrue(left[0].startswith(name + ".vmsnap-0therone (in the trash, id "), left)
        helper("rbd.RBD().trash_remove(io, sys.argv[1])", left[0].rsplit("id ", 1)[1].rstrip(")"))

    def test_a_clone_swap_stopped_after_the_rename_finishes(self):
        # The disk's name is gone between the rename and the clone: the lock must still be
        # granted (the record exists), so recovery can run the step again and finish it.
        disk, layout = self.new_disk(4 * MiB)
        self.write(layout, 0, b"\x05" * 4096)
        layout, _ = self.create(layout, "s1")
        self.p.ok("lockShared", {"disk": disk, "holder": "test", "wait": 5})
        self.p.ok("writeShared", {"disk": disk, "document": "{}"})
        self.p.ok("unlockShared", {"disk": disk})
        self.p.ok("configure", {"settings": {"revert-mode": "clone"}})
        plan = self.p.ok("planRevert", {"snapshot": "s1", "layout": layout})
        self.p.ok("perform", plan["steps"][0]["action"]["backend"])
        swap = plan["steps"][1]["action"]["backend"]
        helper("rbd.RBD().rename(io, sys.argv[1], sys.argv[2])", disk.split("/", 1)[1],
               swap["arguments"]["frozen"].split("/", 1)[1])
        self.p.ok("lockShared", {"disk": disk, "holder": "test", "wait": 5})
        self.p.ok("perform", swap)
        self.p.ok("unlockShared", {"disk": disk})
        layout = plan["result"]
        self.assertEqual(self.read(layout, {"active": True}, 0, 4096), b"\x05" * 4096)
        self.assertEqual(self.p.ok("verify", {"layout": layout})["problems"], [])
        self.assertEqual(self.p.error("lockShared", {"disk": POOL + "/never-made", "holder": "t", "wait": 1})["code"],
                         "notFound")

    def test_create_undo_and_progress_free_answers(self):
        disk, layout = self.new_disk(MiB)
        plan = self.p.ok("planCreate", {"request": {"name": "u", "kind": "internal"}, "layout": layout})
        undo = plan["steps"][0]["undo"]["backend"]
        self.p.ok("perform", undo)   # undo before the step ran: nothing to remove
        run_plan(self.p, plan)
        self.p.ok("perform", undo)
        self.p.ok("perform", undo)
        self.assertNotIn(f"{disk.split('/')[1]}@u", self.inventory())
        self.assertEqual(self.p.progress, [])   # short calls send no progress lines


if __name__ == "__main__":
    unittest.main()
