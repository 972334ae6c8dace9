/*
 * ktel.probes._file_created_pack: file_created records straight to their packed
 * wire events, for the agent's hot path (ktel/probes/file_created.py, pack_run).
 *
 * At 10,000 file creations a second, turning each ring-buffer record into a Python
 * list and that list into msgpack was most of what the agent cost (bench/RESULTS.md,
 * "Agent cost at ordinary rates"). Here a record becomes the msgpack bytes of its
 * event directly, the same bytes msgpack.packb(event, use_bin_type=True) gives for
 * the event file_created.decode_run makes (tests/unit/test_packed_events.py
 * checks that, byte for byte).
 *
 * Only the common case is done here: an absolute path (not one opened inside a root,
 * KTEL_DIR_IN_ROOT), and a comm and path that are valid UTF-8. At any other record
 * the packer stops and returns its index; the caller decodes that record in Python
 * (relative paths, backslash escapes) and calls again from the next one, so events
 * keep the ring buffer's order.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "file_created.h"

/* The ring buffer's record header (u32 len, u32 pgoff), and records padded to 8 bytes
 * (edge_agent/ringbuf.py; ktel/probes/decode.py's stride). */
#define HEADER_SIZE 8
#define STRIDE(size) (((size) + HEADER_SIZE + 7) & ~(size_t)7)

/* The packer never reads the 512-byte dir (the records that use one are left to
 * Python), and a record for an absolute path ends there. */
_Static_assert(offsetof(struct file_created_event, dir) == KTEL_FILE_CREATED_ABS_SIZE,
	       "a record without dir ends at dir");
/* The numbers before comm: copied out, as the run's bytes carry no alignment promise
 * for the struct. comm and path are read where they lie: copying the whole record out
 * (296 bytes, which GCC does with `rep movs`) was about half of the time perf saw in
 * this function itself. */
#define NUMBERS offsetof(struct file_created_event, comm)

/* An event's largest packing: array header, 7 ints of at most 9 bytes, a bool and two
 * strings with their headers (at most 3 bytes each). */
#define EVENT_MAX (1 + 7 * 9 + 1 + (3 + KTEL_COMM_LEN) + (3 + KTEL_PATH_LEN))

/* msgpack's int encoding as msgpack-python chooses it: the shortest form. */
static unsigned char *put_int(unsigned char *p, int64_t d)
{
	uint64_t u = (uint64_t)d;
	int n;

	if (d >= 0 && d < 128) {
		*p++ = (unsigned char)d;
		return p;
	}
	if (d < 0 && d >= -32) {
		*p++ = (unsigned char)(int8_t)d;
		return p;
	}
	if (d < 0) {
		if (d >= -128) {
			*p++ = 0xd0;
			n = 1;
		} else if (d >= -32768) {
			*p++ = 0xd1;
			n = 2;
		} else if (d >= -2147483648LL) {
			*p++ = 0xd2;
			n = 4;
		} else {
			*p++ = 0xd3;
			n = 8;
		}
	} else if (d < 256) {
		*p++ = 0xcc;
		n = 1;
	} else if (d < 65536) {
		*p++ = 0xcd;
		n = 2;
	} else if (d < 4294967296LL) {
		*p++ = 0xce;
		n = 4;
	} else {
		*p++ = 0xcf;
		n = 8;
	}
	while (n--)
		*p++ = (unsigned char)(u >> (8 * n));
	return p;
}

/* A str (use_bin_type=True): fixstr below 32 bytes, str8 below 256, else str16 (a
 * path without its NUL is 256 bytes). */
static unsigned char *put_str(unsigned char *p, const char *s, size_t n)
{
	if (n < 32) {
		*p++ = (unsigned char)(0xa0 | n);
	} else if (n < 256) {
		*p++ = 0xd9;
		*p++ = (unsigned char)n;
	} else {
		*p++ = 0xda;
		*p++ = (unsigned char)(n >> 8);
		*p++ = (unsigned char)n;
	}
	memcpy(p, s, n);
	return p + n;
}

/* Whether Python's strict UTF-8 decoder takes these bytes as they are (then
 * "backslashreplace" changes nothing). ASCII, nearly every comm and path, is checked
 * here; anything else by Python's own decoder, so the answer is Python's. */
static int utf8_as_is(const char *s, size_t n)
{
	size_t i;
	PyObject *u;

	for (i = 0; i < n; i++)
		if ((unsigned char)s[i] >= 0x80)
			break;
	if (i == n)
		return 1;
	u = PyUnicode_DecodeUTF8(s, (Py_ssize_t)n, NULL);
	if (u == NULL) {
		PyErr_Clear();
		return 0;
	}
	Py_DECREF(u);
	return 1;
}

PyDoc_STRVAR(pack_doc, "pack(data, size, start, wall_offset_ns, kind, out, sizes) -> int\n\n"
		       "Append to the bytearray out the packed event of each framed\n"
		       "file_created record of data (records of size bytes: RECORD_SIZE, or\n"
		       "ABS_SIZE without dir) from index start on, and each event's size to\n"
		       "the array('I') sizes; stop at the first record this packer leaves to\n"
		       "Python and return its index (the record count when none is left).");

/* Makes out's size at least need bytes, doubling: a run whose records fall to Python
 * one in two calls this packer once per record, so it must not grow by a run's worth
 * each call. */
static unsigned char *room(PyObject *out, Py_ssize_t need, Py_ssize_t *cap)
{
	Py_ssize_t want = *cap;

	if (need <= want)
		return (unsigned char *)PyByteArray_AS_STRING(out);
	while (want < need)
		want = want < 4096 ? 4096 : 2 * want;
	if (PyByteArray_Resize(out, want) < 0)
		return NULL;
	*cap = want;
	return (unsigned char *)PyByteArray_AS_STRING(out);
}

static PyObject *pack(PyObject *self, PyObject *args)
{
	size_t step;
	Py_buffer buf;
	Py_ssize_t size, start, i, n, had, used, cap;
	long long offset;
	int kind;
	PyObject *out, *sizes, *done = NULL;
	struct file_created_event ev; /* its numbers only (NUMBERS) */
	const char *rec, *comm, *path;
	unsigned char *base, *p;
	uint32_t *lens = NULL;
	size_t comm_len, path_len;
	int64_t ts;

	(void)self;
	if (!PyArg_ParseTuple(args, "y*nnLiO!O", &buf, &size, &start, &offset, &kind,
			      &PyByteArray_Type, &out, &sizes))
		return NULL;
	if (kind < 0 || kind > 127 || start < 0 ||
	    (size != (Py_ssize_t)sizeof(struct file_created_event) &&
	     size != (Py_ssize_t)KTEL_FILE_CREATED_ABS_SIZE)) {
		PyBuffer_Release(&buf);
		PyErr_SetString(PyExc_ValueError,
				"size is RECORD_SIZE or ABS_SIZE, kind is 0-127 (a msgpack fixint) "
				"and start is not negative");
		return NULL;
	}
	step = STRIDE((size_t)size);
	n = buf.len / (Py_ssize_t)step;
	if (start < n && (lens = PyMem_Malloc((size_t)(n - start) * sizeof(*lens))) == NULL) {
		PyBuffer_Release(&buf);
		return PyErr_NoMemory();
	}
	had = used = cap = PyByteArray_GET_SIZE(out);
	for (i = start; i < n; i++) {
		rec = (const char *)buf.buf + i * step + HEADER_SIZE;
		memcpy(&ev, rec, NUMBERS);
		comm = rec + offsetof(struct file_created_event, comm);
		path = rec + offsetof(struct file_created_event, path);
		if (path[0] != '/')
			break; /* relative (or empty): joined with dir or /proc in Python */
		if (ev.dir_state & KTEL_DIR_IN_ROOT)
			break; /* openat2's RESOLVE_IN_ROOT: the path is not what it says */
		/* KTEL_PATH_TRUNCATED changes nothing here: a cut path is sent as its start. */
		if (ev.ts_ns > INT64_MAX ||
		    __builtin_add_overflow((int64_t)ev.ts_ns, (int64_t)offset, &ts))
			break; /* not a clock reading: Python's integers say what it is */
		comm_len = strnlen(comm, KTEL_COMM_LEN);
		path_len = strnlen(path, KTEL_PATH_LEN);
		if (!utf8_as_is(comm, comm_len) || !utf8_as_is(path, path_len))
			break; /* escaped by Python's backslashreplace */
		if ((base = room(out, used + EVENT_MAX, &cap)) == NULL)
			goto fail;
		p = base + used;
		*p++ = 0x99; /* fixarray of 9: kind, ts_ns, pid, tid, uid, comm, path, flags, certain */
		*p++ = (unsigned char)kind;
		p = put_int(p, ts);
		p = put_int(p, ev.pid);
		p = put_int(p, ev.tid);
		p = put_int(p, ev.uid);
		p = put_str(p, comm, comm_len);
		p = put_str(p, path, path_len);
		p = put_int(p, ev.flags);
		*p++ = ev.certain ? 0xc3 : 0xc2;
		lens[i - start] = (uint32_t)(p - (base + used));
		used = p - base;
	}
	/* out back to what was written; then the sizes, in one call. */
	if (PyByteArray_Resize(out, used) < 0)
		goto fail;
	if (i > start) {
		PyObject *r =
			PyObject_CallMethod(sizes, "frombytes", "y#", (const char *)lens,
					    (Py_ssize_t)((size_t)(i - start) * sizeof(*lens)));
		if (r == NULL)
			goto fail;
		Py_DECREF(r);
	}
	done = PyLong_FromSsize_t(i);
fail:
	if (done == NULL && PyByteArray_GET_SIZE(out) != had) {
		/* Nothing appended: out as it came, the error kept. */
		PyObject *type, *value, *tb;

		PyErr_Fetch(&type, &value, &tb);
		if (PyByteArray_Resize(out, had) < 0)
			PyErr_Clear();
		PyErr_Restore(type, value, tb);
	}
	PyMem_Free(lens);
	PyBuffer_Release(&buf);
	return done;
}

static PyMethodDef methods[] = {
	{ "pack", pack, METH_VARARGS, pack_doc },
	{ NULL, NULL, 0, NULL },
};

static struct PyModuleDef module = {
	PyModuleDef_HEAD_INIT,
	"_file_created_pack",
	"file_created records to packed wire events",
	-1,
	methods,
};

PyMODINIT_FUNC PyInit__file_created_pack(void)
{
	PyObject *m = PyModule_Create(&module);

	if (m != NULL &&
	    (PyModule_AddIntConstant(m, "RECORD_SIZE", sizeof(struct file_created_event)) < 0 ||
	     PyModule_AddIntConstant(m, "ABS_SIZE", KTEL_FILE_CREATED_ABS_SIZE) < 0 ||
	     PyModule_AddIntConstant(m, "DIR_IN_ROOT", KTEL_DIR_IN_ROOT) < 0 ||
	     PyModule_AddIntConstant(m, "PATH_TRUNCATED", KTEL_PATH_TRUNCATED) < 0)) {
		Py_DECREF(m);
		return NULL;
	}
	return m;
}
