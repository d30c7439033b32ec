// An embedded CPython interpreter, rewound (issue 12). pymalloc is on, as shipped: small
// objects live in its 1 MiB arenas, which it maps and unmaps itself. The interpreter
// builds a 20,000-entry dict and a list, is checkpointed, mutates (deleting a third of
// the dict, adding 8,000 entries, replacing half the list, making and dropping garbage
// and reference cycles, gc.collect()), and so on for three checkpoints. The host then
// rewinds one level and two levels and checks the Python-level state by a hash computed
// in Python (blake2b of the repr of the sorted dict and the list) against the value
// computed at that checkpoint, kept on the controller's stack. Every mutation is
// deterministic, so after rewinding to the first checkpoint the same mutation must give
// the same hash again; then the interpreter keeps working (allocation, gc.collect()).
// Exit status and output: hosts/host_support.h.
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "host_support.h"

namespace {

using namespace hs;

PyObject* gGlobals;   // __main__'s dict, from before the first snapshot
Progress* gProgress;  // untracked

// Everything the interpreter needs is imported before the first snapshot: an import
// afterwards reads files into tracked buffers (read(2) into write-protected memory fails
// under mprotect, and that is not what this host is about).
const char kSetup[] = R"PY(
import gc, hashlib, random

d = {}
for i in range(20000):
    d["k%05d" % i] = (i, "v" * (i % 23), [i, i * 2, str(i)])
L = [("item", i, "x" * (i % 50)) for i in range(30000)]

def state_hash():
    h = hashlib.blake2b(digest_size=8)
    h.update(repr(sorted(d.items())).encode())
    h.update(repr(L).encode())
    h.update(repr((len(d), len(L))).encode())
    return int.from_bytes(h.digest(), "little")

def mutate(step):
    r = random.Random(step)
    for k in r.sample(list(d), len(d) // 3):
        del d[k]
    for i in range(8000):
        d["s%d_%05d" % (step, i)] = (i, "y" * r.randrange(200), {"n": i, "l": [step] * r.randrange(8)})
    L[:] = L[len(L) // 2:] + [r.randbytes(r.randrange(1, 600)) for _ in range(8000)]
    junk = [[j] * 40 for j in range(40000)]   # tens of arenas, freed at once
    del junk
    for j in range(3000):                     # cycles only the collector frees
        a = [j]
        a.append(a)
    gc.collect()

def keep_going():
    big = [{"i": i, "s": str(i) * 5} for i in range(50000)]
    n = sum(x["i"] for x in big)
    del big
    gc.collect()
    return n
)PY";

// The pending Python exception as "Type: message" in `out` (cleared).
void ExceptionText(char* out, size_t cap) {
  PyObject *type = nullptr, *value = nullptr, *tb = nullptr;
  PyErr_Fetch(&type, &value, &tb);
  PyObject* str = value ? PyObject_Str(value) : nullptr;
  const char* msg = str ? PyUnicode_AsUTF8(str) : nullptr;
  snprintf(out, cap, "%s: %s", type ? ((PyTypeObject*)type)->tp_name : "?", msg ? msg : "?");
  PyErr_Clear();
  Py_XDECREF(str);
  Py_XDECREF(type);
  Py_XDECREF(value);
  Py_XDECREF(tb);
}

void Run(const char* code, const char* when) {
  PyObject* r = PyRun_String(code, Py_file_input, gGlobals, gGlobals);
  if (!r) {
    char why[200];
    ExceptionText(why, sizeof why);
    Broken("%s: Python raised %s running %.60s", when, why, code);
  }
  Py_DECREF(r);
}

// Evaluates an expression giving an int; its low 64 bits.
uint64_t EvalU64(const char* expr, const char* when) {
  PyObject* r = PyRun_String(expr, Py_eval_input, gGlobals, gGlobals);
  if (!r || !PyLong_Check(r)) {
    char why[200] = "not an int";
    if (!r) ExceptionText(why, sizeof why);
    Py_XDECREF(r);
    Broken("%s: evaluating %s: %s", when, expr, why);
  }
  const uint64_t v = (uint64_t)PyLong_AsUnsignedLongLongMask(r);
  Py_DECREF(r);
  return v;
}

}  // namespace

int main() {
  InitializeMemorySnapshots();
  gProgress = StartWatchdog("python_host", 120);
  Py_InitializeEx(0);  // no signal handlers of its own
  PyObject* mainModule = PyImport_AddModule("__main__");
  if (!mainModule) HostError("no __main__ module");
  gGlobals = PyModule_GetDict(mainModule);
  Run(kSetup, "setup");
  uint64_t h[8];  // on the controller's stack: never rewound
  h[0] = EvalU64("state_hash()", "setup");

  Snapshotted() = true;
  Mark("first snapshot");
  TakeFirstMemorySnapshot();  // checkpoint 0
  CheckBackend();
  char when[96];
  auto check = [&](const char* what, uint64_t want) {
    gProgress->phase = what;
    gProgress->step++;
    const uint64_t got = EvalU64("state_hash()", what);
    if (got != want)
      Diverged("%s: the interpreter's state hashes to %016llx, expected %016llx", what,
               (unsigned long long)got, (unsigned long long)want);
  };
  check("checkpoint 0", h[0]);
  gProgress->phase = "mutate 1";
  Run("mutate(1)", "mutate 1");
  h[1] = EvalU64("state_hash()", "mutate 1");
  if (h[1] == h[0]) HostError("mutate(1) changed nothing");
  TakeDiffMemorySnapshot();  // checkpoint 1
  check("checkpoint 1", h[1]);
  gProgress->phase = "mutate 2";
  Run("mutate(2)", "mutate 2");
  h[2] = EvalU64("state_hash()", "mutate 2");
  TakeDiffMemorySnapshot();  // checkpoint 2
  check("checkpoint 2", h[2]);
  gProgress->phase = "mutate 3";
  Run("mutate(3)", "mutate 3");

  gProgress->phase = "rewind to checkpoint 1";
  Mark("rewind one level to checkpoint 1");
  Rewind(1);  // one level: undo mutate 3, pop checkpoint 2
  check("after rewinding one level to checkpoint 1", h[1]);
  gProgress->phase = "mutate 4";
  Run("mutate(4)", "mutate 4");
  TakeDiffMemorySnapshot();  // checkpoint 2 again
  h[2] = EvalU64("state_hash()", "checkpoint 2 again");
  Run("mutate(5)", "mutate 5");
  gProgress->phase = "rewind to checkpoint 0";
  Mark("rewind two levels to checkpoint 0");
  Rewind(2);  // two levels: back to checkpoint 0
  check("after rewinding two levels to checkpoint 0", h[0]);

  // The rewound interpreter does the same thing again, and keeps working.
  gProgress->phase = "mutate 1 again";
  Run("mutate(1)", "mutate 1 after the rewinds");
  check("mutate 1 again after the rewinds", h[1]);
  gProgress->phase = "keep going";
  const uint64_t n = EvalU64("keep_going()", "keep going after the rewinds");
  if (n != 50000ull * 49999ull / 2) Diverged("keep_going() returned %llu", (unsigned long long)n);
  TakeDiffMemorySnapshot();  // checkpoint 1 again
  Run("mutate(6)", "mutate 6");
  Rewind(0);
  snprintf(when, sizeof when, "after the last rewind");
  check(when, h[1]);
  Run("gc.collect()", when);

  const MemsnapStats st = Stats();
  Say("PASS python_host: Python %s, backend %s, %zu-byte pages: %ld rewinds, %llu faults\n",
      Py_GetVersion(), BackendName(st.backend), memsnap_page_size(), gProgress->rewinds,
      (unsigned long long)st.faults_handled);
  _exit(0);
}
