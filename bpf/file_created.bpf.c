// SPDX-License-Identifier: GPL-2.0
/*
 * ktel probe file_created, stable-tracepoint fallback: a file opened with
 * O_CREAT whose open succeeded. Hosts with the ktel filewatcher module use its
 * filewatcher:file_created tracepoint instead, which sees the create itself.
 *
 * The path pointer is saved at sys_enter and read at sys_exit, when the kernel
 * has faulted the string in (the same reason bcc's opensnoop reads it late).
 */
/* Compiled after bpf/ktel_common.bpf.h (the agent prepends it: BCC rewrites
 * map calls such as counters.lookup() only in the main file, not in headers). */
#include "file_created.h"
#include "ktel_tracepoints.bpf.h"

/* Every record leaves through here: one marked KTEL_PATH_TRUNCATED is counted. */
static __always_inline void file_created_submit(struct file_created_event *ev)
{
	if (ev->dir_state & KTEL_PATH_TRUNCATED)
		ktel_count(KTEL_COUNTER_PATH_TRUNCATED);
	ktel_submit(ev);
}

/*
 * filewatcher:file_created (the ktel filewatcher module, kmod/filewatcher.c)
 * reports only files an open really created. Always compiled, so the verifier
 * checks it on every host; attached by the agent where the tracepoint exists
 * (edge_agent/probes.py), and then KTEL_HAVE_FILEWATCHER leaves the syscall
 * fallback below out.
 */
int file_created_filewatcher(struct filewatcher_ctx *ctx)
{
	struct file_created_event *ev = ktel_reserve(KTEL_FILE_CREATED_ABS_SIZE);

	if (!ev)
		return 0;
	ktel_tp_file_created(ev, ctx);
	/*
	 * The module's path is d_path()'s, always absolute, or "(d_path failed)" when the
	 * file's path did not fit its PATH_MAX buffer (kmod/README.md): sent as it is (the
	 * record's dirfd is KTEL_DIRFD_NONE, so the agent never resolves it against the
	 * process's cwd), and counted, as nothing else says the event names no file.
	 */
	if (ev->path[0] != '/')
		ktel_count(KTEL_COUNTER_PATH_UNRESOLVED);
	file_created_submit(ev);
	return 0;
}

#ifndef KTEL_HAVE_FILEWATCHER

/* asm-generic/fcntl.h values; identical on x86_64 and arm64. */
#define KTEL_O_CREAT 00000100
#define KTEL_O_EXCL 00000200
#define KTEL_O_WRONLY 00000001
#define KTEL_O_TRUNC 00001000
#define KTEL_AT_FDCWD -100
/* include/uapi/linux/openat2.h */
#define KTEL_RESOLVE_IN_ROOT 0x10

struct pending_open {
	const char *filename;
	__u32 flags;
	__s32 dirfd;
	/* openat2 with RESOLVE_IN_ROOT: the path is resolved inside dirfd, as in a root */
	__u8 in_root;
	__u8 pad[7]; /* named, so that = {} zeroes what the map update copies */
};

/*
 * Keyed by pid_tgid: one syscall in flight per thread. An LRU hash, so that an
 * entry whose sys_exit never ran (a thread that entered before the exit
 * program was attached) cannot hold a slot for ever. The LRU evicts to make
 * room, and not only when the map is full: a CPU whose local free list is
 * empty evicts before it takes free slots from other CPUs' lists
 * (kernel/bpf/bpf_lru_list.c, 6.1 and 6.18). An open whose entry was evicted
 * is found by its mark in open_marks below and counted.
 */
#ifndef KTEL_PENDING_MAX
#define KTEL_PENDING_MAX 10240
#endif
BPF_TABLE("lru_hash", u64, struct pending_open, pending, KTEL_PENDING_MAX);

/*
 * One mark per thread with an O_CREAT open in flight, in task-local storage:
 * it lives and dies with the thread, never fills and is never evicted, so at
 * sys_exit "marked but not in pending" means "evicted". Task storage is open
 * to tracepoint programs since 5.12 (commit a10787e6d58c, "bpf: Enable task
 * local storage for tracing programs"); the agent's tests load this on 6.1
 * (the VM) and 6.18.
 */
BPF_TASK_STORAGE(open_marks, u64);

static __always_inline int open_enter(const char *filename, u32 flags, s32 dirfd, u8 in_root)
{
	struct pending_open p = {};
	u64 id, *mark;

	if (!(flags & KTEL_O_CREAT))
		return 0;
	id = bpf_get_current_pid_tgid();
	mark = open_marks.task_storage_get(bpf_get_current_task_btf(), 0,
					   BPF_LOCAL_STORAGE_GET_F_CREATE);
	p.filename = filename;
	p.flags = flags;
	p.dirfd = dirfd;
	p.in_root = in_root;
	if (pending.update(&id, &p)) {
		/* Not tracked at all: lost, if it creates. Counted now, once. */
		ktel_count(KTEL_COUNTER_INFLIGHT_LOST);
		return 0;
	}
	if (mark)
		*mark = 1;
	else
		ktel_count(KTEL_COUNTER_INFLIGHT_LOST); /* no mark: an eviction would go unseen */
	return 0;
}

#ifdef KTEL_OFF_TASK_FS
/*
 * Resolving a relative path: the directory it was relative to, read from the
 * kernel's dentries as d_path() would, without d_path(), which BPF may call
 * only from fentry/fexit, LSM and iterator programs on an allow-list of
 * functions (bpf_d_path, kernel/trace/bpf_trace.c), not from a tracepoint.
 *
 * The struct offsets are the running kernel's, from its BTF: the agent passes
 * them as KTEL_OFF_* (ktel/probes/file_created.py), because BCC compiles
 * against whatever headers the host has and relocates nothing. Pointers are
 * read with bpf_probe_read_kernel(), so a dentry renamed or freed under the
 * walk gives a wrong or truncated name, never a fault. Read at the syscall's
 * return: a chdir(), or a close() or dup2() of the fd, by another thread of the
 * process in between is where that differs from what the open used.
 *
 * Also the created file's own path, from the fd the open returned (openat2's
 * RESOLVE_IN_ROOT, bpf/file_created.h).
 */
#define KTEL_DIR_STEPS 64 /* components and mount crossings */

static __always_inline void *ktel_kptr(const void *base, u32 off)
{
	void *p = NULL;

	bpf_probe_read_kernel(&p, sizeof(p), (const char *)base + off);
	return p;
}

/* The struct path at @base + @off: its mount (struct vfsmount *) and dentry. */
static __always_inline void ktel_path_of(const void *base, u32 off, void **mnt, void **dentry)
{
	*mnt = ktel_kptr(base, off + KTEL_OFF_PATH_MNT);
	*dentry = ktel_kptr(base, off + KTEL_OFF_PATH_DENTRY);
}

static __always_inline void file_created_dir(struct file_created_event *ev, s32 dirfd)
{
	void *task = (void *)bpf_get_current_task();
	void *fs = ktel_kptr(task, KTEL_OFF_TASK_FS);
	void *mnt, *dentry, *root_mnt, *root_dentry;
	int i;

	if (!fs)
		return;
	ktel_path_of(fs, KTEL_OFF_FS_ROOT, &root_mnt, &root_dentry);
	if (dirfd == KTEL_AT_FDCWD) {
		ktel_path_of(fs, KTEL_OFF_FS_PWD, &mnt, &dentry);
	} else {
		/* current->files->fdt->fd[dirfd]->f_path, as fdget() finds it. */
		void *files = ktel_kptr(task, KTEL_OFF_TASK_FILES);
		void *fdt = ktel_kptr(files, KTEL_OFF_FILES_FDT);
		void *file;
		u32 max_fds = 0;

		bpf_probe_read_kernel(&max_fds, sizeof(max_fds),
				      (char *)fdt + KTEL_OFF_FDT_MAX_FDS);
		if (dirfd < 0 || (u32)dirfd >= max_fds)
			return;
		file = ktel_kptr(ktel_kptr(fdt, KTEL_OFF_FDT_FD), (u32)dirfd * sizeof(void *));
		if (!file)
			return;
		ktel_path_of(file, KTEL_OFF_FILE_PATH, &mnt, &dentry);
	}
	ev->dir_len = 0;
	for (i = 0; i < KTEL_DIR_STEPS; i++) {
		void *mount, *parent, *up;
		const char *name;
		u32 off;
		long n;

		if (!dentry || !mnt)
			return;
		/* The task's root (a chroot's too) is where d_path() stops. */
		if (dentry == root_dentry && mnt == root_mnt)
			goto done;
		if (dentry == ktel_kptr(mnt, KTEL_OFF_VFSMOUNT_ROOT)) {
			/* The root of a mount: go on from where it is mounted. */
			/* container_of(mnt, struct mount, mnt) */
			mount = (char *)mnt - KTEL_OFF_MOUNT_MNT;
			up = ktel_kptr(mount, KTEL_OFF_MOUNT_PARENT);
			if (up == mount)
				goto done; /* the top of the mount tree, outside the task's root */
			dentry = ktel_kptr(mount, KTEL_OFF_MOUNT_MOUNTPOINT);
			mnt = (char *)up + KTEL_OFF_MOUNT_MNT;
			continue;
		}
		parent = ktel_kptr(dentry, KTEL_OFF_DENTRY_PARENT);
		if (parent == dentry)
			return; /* a root that is no mount's: unreachable, as d_path() says */
		/*
		 * The offset lives in the record, not in a register, and is read back
		 * unknown to the verifier: a register's exact range, different after
		 * every name, would keep it from merging the walk's paths, and it
		 * refuses the program as too complex (E2BIG) long before 64 steps.
		 */
		off = *(volatile __u16 *)&ev->dir_len;
		if (off >= KTEL_DIR_LEN / 2) {
			ev->dir_state = KTEL_DIR_TRUNCATED;
			return;
		}
		name = ktel_kptr(dentry, KTEL_OFF_DENTRY_NAME + KTEL_OFF_QSTR_NAME);
		/* off < KTEL_DIR_LEN / 2 and a name is at most NAME_MAX + 1 bytes: in dir. */
		n = bpf_probe_read_kernel_str(&ev->dir[off & (KTEL_DIR_LEN / 2 - 1)],
					      KTEL_DIR_LEN / 2, name);
		if (n <= 0)
			return;
		*(volatile __u16 *)&ev->dir_len = off + n;
		dentry = parent;
	}
	ev->dir_state = KTEL_DIR_TRUNCATED;
	return;
done:
	ev->dir_state = KTEL_DIR_OK;
}
#endif /* KTEL_OFF_TASK_FS */

/*
 * Everything but dir, which only a record for a relative path (or one opened in a root)
 * has. Returns whether path holds only the start of the caller's string.
 */
static __always_inline int open_fill(struct file_created_event *ev, const struct pending_open *p,
				     u64 id)
{
	char next = 0;
	long n;

	ev->ts_ns = bpf_ktime_get_ns();
	ev->pid = id >> 32;
	ev->tid = (u32)id;
	ev->uid = (u32)bpf_get_current_uid_gid();
	ev->dirfd = p->dirfd;
	ev->flags = p->flags;
	ev->certain = !!(p->flags & KTEL_O_EXCL);
	ev->dir_state = KTEL_DIR_NONE;
	ev->dir_len = 0;
	bpf_get_current_comm(ev->comm, sizeof(ev->comm));
	n = bpf_probe_read_user_str(ev->path, sizeof(ev->path), p->filename);
	if (n < 0) {
		ev->path[0] = 0;
		return 0;
	}
	/*
	 * n counts the NUL it wrote, so a full field is a string of KTEL_PATH_LEN - 1
	 * bytes or the start of a longer one: its next byte, NUL or not, tells which.
	 */
	return n == KTEL_PATH_LEN &&
	       bpf_probe_read_user(&next, 1, p->filename + KTEL_PATH_LEN - 1) == 0 && next;
}

static __always_inline int open_exit(long ret)
{
	u64 id = bpf_get_current_pid_tgid();
	struct pending_open *entry = pending.lookup(&id);
	struct pending_open op;
	struct file_created_event *ev;
	char first = 0;
	int cut;
	u64 *mark = open_marks.task_storage_get(bpf_get_current_task_btf(), 0, 0);
	int marked = mark && *mark;

	if (marked)
		*mark = 0;
	if (!entry) {
		/* Marked at sys_enter, gone now: the LRU evicted it. A failed open was no event. */
		if (marked && ret >= 0)
			ktel_count(KTEL_COUNTER_INFLIGHT_LOST);
		return 0;
	}
	if (ret < 0)
		goto out;
	/* Copied out: the LRU may reuse the entry for another open during the walk below. */
	__builtin_memcpy(&op, entry, sizeof(op));
	/*
	 * An absolute path needs no dir: its record ends there (bpf/file_created.h). If
	 * the caller rewrites the path between this read and the one below, the record
	 * is still one without dir, and the agent resolves the path from /proc. Under
	 * RESOLVE_IN_ROOT no path means what it says: the record carries the file's own.
	 */
	if (!op.in_root && bpf_probe_read_user(&first, 1, op.filename) == 0 && first == '/') {
		ev = ktel_reserve(KTEL_FILE_CREATED_ABS_SIZE);
		if (!ev)
			goto out;
		if (open_fill(ev, &op, id))
			ev->dir_state |= KTEL_PATH_TRUNCATED;
		file_created_submit(ev);
		goto out;
	}
	ev = ktel_reserve(sizeof(*ev));
	if (!ev)
		goto out;
	cut = open_fill(ev, &op, id);
#ifdef KTEL_OFF_TASK_FS
	/*
	 * In a root, dir is the created file's whole path, walked from the fd the open
	 * returned: the path as passed is inside dirfd, with "..", and symlinks, resolved
	 * against it, which joining text cannot redo. One call, so the walk is inlined
	 * once (the verifier's budget).
	 */
	if (ev->path[0] != '/' || op.in_root)
		file_created_dir(ev, op.in_root ? (s32)ret : op.dirfd);
#endif
	/* After the walk, which sets dir_state. In a root, a whole walk names the file, not path. */
	if (cut && !(op.in_root && ev->dir_state == KTEL_DIR_OK))
		ev->dir_state |= KTEL_PATH_TRUNCATED;
	if (op.in_root)
		ev->dir_state |= KTEL_DIR_IN_ROOT;
	file_created_submit(ev);
out:
	pending.delete(&id);
	return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_openat)
{
	return open_enter(args->filename, args->flags, args->dfd, 0);
}

TRACEPOINT_PROBE(syscalls, sys_exit_openat)
{
	return open_exit(args->ret);
}

TRACEPOINT_PROBE(syscalls, sys_enter_openat2)
{
	/* struct open_how's first version (include/uapi/linux/openat2.h): every openat2
	 * the kernel accepts passes at least these 24 bytes. */
	struct {
		u64 flags;
		u64 mode;
		u64 resolve;
	} how = {};

	if (bpf_probe_read_user(&how, sizeof(how), args->how))
		return 0;
	return open_enter(args->filename, (u32)how.flags, args->dfd,
			  !!(how.resolve & KTEL_RESOLVE_IN_ROOT));
}

TRACEPOINT_PROBE(syscalls, sys_exit_openat2)
{
	return open_exit(args->ret);
}

TRACEPOINT_PROBE(syscalls, sys_enter_creat)
{
	/* creat(2) is open(O_CREAT|O_WRONLY|O_TRUNC). */
	return open_enter(args->pathname, KTEL_O_CREAT | KTEL_O_WRONLY | KTEL_O_TRUNC,
			  KTEL_AT_FDCWD, 0);
}

TRACEPOINT_PROBE(syscalls, sys_exit_creat)
{
	return open_exit(args->ret);
}

/*
 * open(2) has its own tracepoint only where the kernel builds the syscall
 * (x86_64 does, arm64 does not); the loader defines KTEL_HAVE_SYS_OPEN then.
 */
#ifdef KTEL_HAVE_SYS_OPEN
TRACEPOINT_PROBE(syscalls, sys_enter_open)
{
	return open_enter(args->filename, args->flags, KTEL_AT_FDCWD, 0);
}

TRACEPOINT_PROBE(syscalls, sys_exit_open)
{
	return open_exit(args->ret);
}
#endif
#endif /* KTEL_HAVE_FILEWATCHER */
