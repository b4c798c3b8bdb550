"""Speaks the plug-in protocol to vmsnap-backend-raw and runs its plans the way vmsnap does.

Run: python3 -m unittest discover -s backends/raw/Tests -v
"""

import base64
import json
import os
import queue
import stat
import subprocess
import sys
import tempfile
import threading
import unittest

PLUGIN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "vmsnap-backend-raw")
TIMEOUT = 10  # seconds for every answer line
MiB = 1 << 20


class Plugin:
    """One running plug-in: send requests, read answers with a timeout."""

    def __init__(self):
        self.proc = subprocess.Popen([PLUGIN], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
        self.lines = queue.Queue()
        self.next_id = 0
        threading.Thread(target=self._pump, daemon=True).start()
        threading.Thread(target=self.proc.stderr.read, daemon=True).start()  # drain

    def _pump(self):
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def send_raw(self, data):
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def answer(self):
        try:
            line = self.lines.get(timeout=TIMEOUT)
        except queue.Empty:
            raise AssertionError(f"no answer within {TIMEOUT} s") from None
        if line is None:
            raise AssertionError("plug-in exited")
        return json.loads(line)

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
        return reply["error"]

    def close(self):
        self.proc.stdin.close()
        rc = self.proc.wait(timeout=TIMEOUT)
        self.proc.stdout.close()
        self.proc.stderr.close()
        return rc


def run_plan(plan):
    """Run a plan's steps as vmsnap's executor does (idempotent actions)."""
    for step in plan["steps"]:
        action = step["action"]
        if "run" in action:
            subprocess.run(action["run"], check=True, timeout=60)
        elif "removeFile" in action:
            try:
                os.unlink(action["removeFile"])
            except FileNotFoundError:
                pass
        elif "rename" in action:
            src, dst = action["rename"]["from"], action["rename"]["to"]
            if not (not os.path.exists(src) and os.path.exists(dst)):
                os.rename(src, dst)
        else:
            raise AssertionError(f"unexpected action {action}")
    return plan["result"]


def filesystem_can_reflink(directory):
    with tempfile.NamedTemporaryFile(dir=directory) as f:
        f.write(b"x" * 4096)
        f.flush()
        dst = f.name + ".clone"
        ok = subprocess.run(["cp", "--reflink=always", f.name, dst], stderr=subprocess.DEVNULL).returncode == 0
        if os.path.exists(dst):
            os.unlink(dst)
    return ok


class RawPluginTests(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.dir = self.tmp.name
        self.pool = {"directory": self.dir, "options": {}}
        self.p = Plugin()
        self.assertEqual(self.p.ok("hello", {"host": "vmsnap test", "apiVersion": 1, "apiAge": 0})["kind"], "raw")

    def tearDown(self):
        self.assertEqual(self.p.close(), 0)
        self.tmp.cleanup()

    def new_disk(self, size=4 * MiB):
        path = self.p.ok("createDisk", {"name": "d", "size": size, "pool": self.pool})["locator"]
        return path, self.p.ok("adopt", {"locator": path})

    def write(self, layout, offset, data):
        self.p.ok("write", {"bytes": base64.b64encode(data).decode(), "offset": offset, "layout": layout})

    def read(self, layout, view, offset, length):
        return base64.b64decode(self.p.ok("read", {"view": view, "offset": offset, "length": length, "layout": layout})["bytes"])

    def create(self, layout, name):
        plan = self.p.ok("planCreate", {"request": {"name": name, "kind": "external"}, "layout": layout})
        return run_plan(plan), plan

    # --- handshake and description ---------------------------------------------------------

    def test_executable_mode(self):
        mode = os.stat(PLUGIN).st_mode
        self.assertTrue(mode & stat.S_IXUSR)
        self.assertFalse(mode & (stat.S_IWGRP | stat.S_IWOTH))

    def test_hello_version_ranges(self):
        err = self.p.error("hello", {"host": "vmsnap 9", "apiVersion": 5, "apiAge": 0})
        self.assertEqual(err["code"], "unsupported")
        self.assertIn("5..5", err["message"])
        self.assertIn("1..1", err["message"])
        self.assertEqual(self.p.ok("hello", {"host": "vmsnap 9", "apiVersion": 3, "apiAge": 2})["apiVersion"], 1)

    def test_describe(self):
        d = self.p.ok("describe")
        self.assertEqual((d["kind"], d["locators"], d["liveSnapshots"], d["driveFormat"]), ("raw", "path", "storage", "raw"))
        cells = {(c["operation"], c["kind"], c["state"]) for c in d["capabilities"]["supported"]}
        self.assertIn(("revert", "external", "offline"), cells)
        self.assertIn(("create", "external", "live"), cells)
        self.assertNotIn(("revert", "external", "live"), cells)
        self.assertFalse(any(k == "internal" for _, k, _ in cells))
        self.assertEqual(d["settings"][0]["name"], "copy-mode")
        self.assertEqual(self.p.ok("configure", {"settings": {"copy-mode": "sparse"}}), {})

    def test_unknown_method_and_bad_lines(self):
        self.assertEqual(self.p.error("frobnicate")["code"], "unsupported")
        self.p.send_raw(b"{this is not json\n")
        reply = self.p.answer()
        self.assertIsNone(reply["id"])
        self.assertEqual(reply["error"]["code"], "invalidArgument")
        self.p.send_raw(b"\xff\xfe\n")
        self.assertEqual(self.p.answer()["error"]["code"], "invalidArgument")
        self.assertEqual(self.p.error("planCreate", {"layout": 3})["code"], "invalidArgument")
        self.assertEqual(self.p.ok("describe")["kind"], "raw")  # still working

    # --- the snapshot cycle ----------------------------------------------------------------

    def test_create_revert_delete_cycle(self):
        disk, layout = self.new_disk()
        self.assertEqual(layout["disk"]["active"], disk)
        self.assertEqual(self.p.ok("state", {"layout": layout}), {"state": "offline"})
        self.assertEqual(self.p.ok("hypervisorDrive", {"layout": layout}),
                         {"path": disk, "format": "raw", "sourceType": "file"})
        old = b"before snapshot " * 256
        self.write(layout, MiB, old)

        plan = self.p.ok("planCreate", {"request": {"name": "s1", "kind": "external", "description": "first"},
                                        "layout": layout})
        self.assertEqual(plan["pointOfNoReturn"], 2)
        self.assertEqual(plan["steps"][0]["action"]["run"][:3], ["cp", "--reflink=auto", "--sparse=always"])
        self.assertTrue(any(n.startswith("copy: ") for n in plan["notes"]), plan["notes"])
        self.assertEqual(self.p.ok("poolInventory", {"pool": self.pool})["items"], ["d.raw"])  # planning changed nothing
        layout = run_plan(plan)
        s1 = layout["snapshots"][0]
        self.assertEqual((s1["name"], s1["kind"], s1["description"], s1["virtualSize"]), ("s1", "external", "first", 4 * MiB))
        self.assertTrue(s1["image"].startswith(disk + ".snap-s1-"))
        self.assertEqual(layout["disk"]["current"], "s1")
        self.assertEqual(layout["layers"], [{"image": disk}])
        self.assertEqual(self.p.ok("rollbackBlockers", {"snapshot": "s1", "layout": layout}), {"blockers": []})

        again = self.p.ok("planCreate", {"request": {"name": "s1", "kind": "external"}, "layout": layout})
        self.assertEqual(again["steps"], [])
        self.assertEqual(again["result"], layout)
        self.assertEqual(self.p.error("planCreate", {"request": {"name": "s1", "kind": "internal"}, "layout": layout})["code"], "unsupported")

        new = b"after snapshot!! " * 256
        self.write(layout, MiB, new)
        self.assertEqual(self.read(layout, {"snapshot": "s1"}, MiB, len(old)), old)
        self.assertEqual(self.read(layout, {"active": True}, MiB, len(new)), new)
        blockers = self.p.ok("rollbackBlockers", {"snapshot": "s1", "layout": layout})["blockers"]
        self.assertEqual([(b["kind"], b["blocking"]) for b in blockers], [("unsaved-changes", False)])
        self.assertIn("'s1'", blockers[0]["detail"])

        layout, s2plan = self.create(layout, "s2")
        self.assertEqual(layout["snapshots"][1]["parent"], "s1")

        revert = self.p.ok("planRevert", {"snapshot": "s1", "layout": layout})
        self.assertEqual(revert["pointOfNoReturn"], 1)
        inode = os.stat(disk).st_ino
        layout = run_plan(revert)
        self.assertNotEqual(os.stat(disk).st_ino, inode)
        self.assertEqual(layout["disk"]["current"], "s1")
        self.assertEqual(self.read(layout, {"active": True}, MiB, len(old)), old)
        self.assertEqual(self.p.ok("rollbackBlockers", {"snapshot": "s2", "layout": layout}), {"blockers": []})
        self.assertEqual(self.p.error("planRevert", {"snapshot": "nope", "layout": layout})["code"], "notFound")

        s2_image = layout["snapshots"][1]["image"]
        delete = self.p.ok("planDelete", {"snapshot": "s1", "mode": "merge", "layout": layout})
        self.assertEqual(delete["pointOfNoReturn"], 0)
        layout = run_plan(delete)
        self.assertEqual([s["name"] for s in layout["snapshots"]], ["s2"])
        self.assertNotIn("parent", layout["snapshots"][0])
        self.assertNotIn("current", layout["disk"])
        self.assertEqual(self.read(layout, {"snapshot": "s2"}, MiB, len(new)), new)
        self.assertEqual(self.p.ok("verify", {"layout": layout}), {"problems": []})
        self.assertEqual(sorted(os.listdir(self.dir)), sorted(["d.raw", os.path.basename(s2_image)]))

        self.p.ok("destroyDisk", {"layout": layout})
        self.assertEqual(self.p.ok("poolInventory", {"pool": self.pool})["items"], [])

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
        layout = run_plan(tree)
        self.assertEqual(os.listdir(self.dir), ["d.raw"])

    def test_names_map_to_distinct_files(self):
        disk, layout = self.new_disk(MiB)
        images = set()
        for name in ("a b", "a_b", "été/1"):
            layout, _ = self.create(layout, name)
            images.add(layout["snapshots"][-1]["image"])
        self.assertEqual(len(images), 3)
        for image in images:
            self.assertEqual(os.path.dirname(image), self.dir)
            self.assertRegex(os.path.basename(image), r"^d\.raw\.snap-[A-Za-z0-9._-]+-[0-9a-f]{8}$")
        self.assertEqual(self.p.ok("verify", {"layout": layout}), {"problems": []})

    def test_refusals(self):
        disk, layout = self.new_disk(MiB)
        target = self.p.ok("planCreate", {"request": {"name": "x", "kind": "external"}, "layout": layout})["steps"][1]["action"]["rename"]["to"]
        open(target, "wb").close()
        self.assertEqual(self.p.error("planCreate", {"request": {"name": "x", "kind": "external"}, "layout": layout})["code"], "alreadyExists")
        os.unlink(target)
        relative = json.loads(json.dumps(layout))
        relative["disk"]["active"] = "d.raw"
        self.assertEqual(self.p.error("planCreate", {"request": {"name": "x", "kind": "external"}, "layout": relative})["code"], "invalidArgument")
        self.assertEqual(self.p.error("inspect", {"locator": self.dir + "/missing.raw"})["code"], "notFound")
        self.assertEqual(self.p.error("inspect", {"locator": self.dir})["code"], "invalidArgument")
        self.assertEqual(self.p.error("read", {"view": {"active": True}, "offset": MiB, "length": 1, "layout": layout})["code"], "invalidArgument")
        self.assertEqual(self.p.error("createDisk", {"name": "d", "size": 1, "pool": self.pool})["code"], "alreadyExists")
        self.assertEqual(self.p.error("perform", {"name": "x", "arguments": {}})["code"], "unsupported")

    def test_copy_modes(self):
        disk, layout = self.new_disk(MiB)
        request = {"request": {"name": "m", "kind": "external"}, "layout": layout}
        self.p.ok("configure", {"settings": {"copy-mode": "sparse"}})
        plan = self.p.ok("planCreate", request)
        self.assertEqual(plan["steps"][0]["action"]["run"][1], "--reflink=never")
        self.assertIn("copy: sparse full copy (0 MiB)", plan["notes"])
        self.p.ok("configure", {"settings": {"copy-mode": "reflink"}})
        if filesystem_can_reflink(self.dir):
            plan = self.p.ok("planCreate", request)
            self.assertEqual(plan["steps"][0]["action"]["run"][1], "--reflink=always")
            self.assertIn("copy: reflink (instant, shares blocks)", plan["notes"])
        else:
            self.assertEqual(self.p.error("planCreate", request)["code"], "unsupported")
        self.assertEqual(os.listdir(self.dir), ["d.raw"])  # the probe left nothing behind

    # --- detection and state ---------------------------------------------------------------

    def test_recognizes_and_inspect(self):
        disk, _ = self.new_disk(MiB)
        self.assertEqual(self.p.ok("recognizes", {"locator": disk}), {"recognized": True})
        info = self.p.ok("inspect", {"locator": disk})
        self.assertEqual((info["format"], info["virtualSize"], info["backingChain"]), ("raw", MiB, []))
        qcow = os.path.join(self.dir, "q.img")
        with open(qcow, "wb") as f:
            f.write(b"QFI\xfb" + bytes(1020))
        self.assertEqual(self.p.ok("recognizes", {"locator": qcow}), {"recognized": False})
        vhd = os.path.join(self.dir, "v.img")
        with open(vhd, "wb") as f:
            f.write(bytes(512) + b"conectix" + bytes(504))
        self.assertEqual(self.p.ok("recognizes", {"locator": vhd}), {"recognized": False})
        fifo = os.path.join(self.dir, "f.raw")
        os.mkfifo(fifo)
        self.assertEqual(self.p.ok("recognizes", {"locator": fifo}), {"recognized": False})
        self.assertEqual(self.p.error("inspect", {"locator": fifo})["code"], "invalidArgument")
        self.assertEqual(self.p.error("adopt", {"locator": fifo})["code"], "invalidArgument")
        on_fifo = {"disk": {"id": fifo, "kind": "raw", "active": fifo, "createdAt": 0}, "snapshots": [], "layers": []}
        self.assertEqual(self.p.error("write", {"bytes": "AA==", "offset": 0, "layout": on_fifo})["code"], "invalidArgument")
        self.assertEqual(self.p.error("read", {"view": {"active": True}, "offset": 0, "length": 0, "layout": on_fifo})["code"], "invalidArgument")
        self.assertEqual(self.p.error("state", {"layout": on_fifo})["code"], "invalidArgument")
        self.assertEqual(self.p.ok("recognizes", {"locator": os.path.join(self.dir, "none.raw")}), {"recognized": False})
        other = os.path.join(self.dir, "plain.bin")
        open(other, "wb").close()
        self.assertEqual(self.p.ok("recognizes", {"locator": other}), {"recognized": False})

    def hold_lock(self, path, byte):
        """A child process holding a POSIX read lock on one byte of `path` (QEMU uses OFD locks;
        F_OFD_GETLK reports both kinds)."""
        holder = subprocess.Popen(
            [sys.executable, "-c",
             "import fcntl, os, sys, time\n"
             "fd = os.open(sys.argv[1], os.O_RDONLY)\n"
             "fcntl.lockf(fd, fcntl.LOCK_SH, 1, int(sys.argv[2]))\n"
             "print('locked', flush=True)\n"
             "time.sleep(60)\n", path, str(byte)], stdout=subprocess.PIPE)
        self.addCleanup(lambda: (holder.kill(), holder.wait(), holder.stdout.close()))
        self.assertEqual(holder.stdout.readline().strip(), b"locked")
        return holder

    def test_state_live_while_another_process_locks(self):
        disk, layout = self.new_disk(MiB)
        layout, _ = self.create(layout, "s1")
        outside = self.hold_lock(disk, 300)   # QEMU's lock bytes are 100..299
        self.assertEqual(self.p.ok("state", {"layout": layout}), {"state": "offline"})
        inside = self.hold_lock(disk, 201)
        self.assertEqual(self.p.ok("state", {"layout": layout}), {"state": "live"})
        self.assertEqual(self.p.error("planRevert", {"snapshot": "s1", "layout": layout})["code"], "inUse")
        self.assertEqual(len(self.p.ok("planCreate", {"request": {"name": "s2", "kind": "external"},
                                                      "layout": layout})["steps"]), 2)
        inside.kill()
        inside.wait()
        self.assertEqual(self.p.ok("state", {"layout": layout}), {"state": "offline"})
        self.assertEqual(len(self.p.ok("planRevert", {"snapshot": "s1", "layout": layout})["steps"]), 2)

if __name__ == "__main__":
    unittest.main()
