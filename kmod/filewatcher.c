// SPDX-License-Identifier: GPL-2.0
/* filewatcher.c - emits filewatcher:file_created for each file an open really created. */

/*
 * A file-creation watcher that reports only what happened (not every open
 * that asked for O_CREAT):
 *
 * - A kretprobe on do_filp_open(), which every open(2)-family syscall and
 *   filp_open() go through. Its entry handler reads the third argument,
 *   const struct open_flags *op, and keeps only calls with O_CREAT (others
 *   cannot create a file, and skipping them costs no kretprobe instance).
 * - Its return handler reports a file only when do_filp_open() returned a
 *   file (not an ERR_PTR: O_CREAT|O_EXCL on an existing file fails with
 *   -EEXIST) whose f_mode has FMODE_CREATED, which namei sets only when this
 *   open created the inode (since 4.19, commit 73a09dd94377 "introduce
 *   FMODE_CREATED and switch to it"). O_CREAT alone is not enough: it also
 *   opens existing files.
 * - Each creation also adds 1 to the ktel counter
 *   filewatcher_files_created_total{fs=<filesystem type>}.
 *
 * Not reported: O_TMPFILE files (unnamed, and without O_CREAT), and files
 * made by mknod(2) or by a filesystem's own code without do_filp_open().
 * Opens missed because all kretprobe instances were busy are counted in
 * /sys/kernel/debug/filewatcher/missed.
 *
 * Tested on Debian's 6.1 kernel (x86_64, in qemu). do_filp_open() is a
 * kernel-internal function: its signature and struct open_flags may change
 * between versions; both are quoted below with the version they come from.
 */

#include <linux/debugfs.h>
#include <linux/dcache.h>
#include <linux/err.h>
#include <linux/fcntl.h>
#include <linux/fs.h>
#include <linux/kernel.h>
#include <linux/kprobes.h>
#include <linux/limits.h>
#include <linux/module.h>
#include <linux/path.h>
#include <linux/percpu.h>
#include <linux/ptrace.h>
#include <linux/sched.h>
#include <linux/stat.h>
#include <linux/version.h>
#include <ktel/ktel.h>

/* The one place that instantiates the filewatcher:* events. */
#define CREATE_TRACE_POINTS
#include "filewatcher_trace.h"

/*
 * The kretprobe reads do_filp_open()'s third argument as
 *	struct file *do_filp_open(int dfd, struct filename *pathname, const struct open_flags *op);
 * (fs/internal.h) and the head of struct open_flags below: a kernel-internal
 * signature, checked where ktel relies on it. It holds in 6.1 (Debian's
 * 6.1 kernel, where tests/vm builds and runs this module) and in 6.18 (that
 * kernel's BTF gives the same prototype, with open_flag at offset 0 and mode at
 * 4 in struct open_flags). Other kernels may pass other arguments: the entry
 * handler would read a wrong pointer as struct open_flags, so the build stops
 * until fs/internal.h of that kernel has been checked and the range widened.
 */
#if LINUX_VERSION_CODE < KERNEL_VERSION(6, 1, 0) || LINUX_VERSION_CODE >= KERNEL_VERSION(6, 19, 0)
#error "filewatcher: do_filp_open(int dfd, struct filename *, const struct open_flags *) is checked for kernels 6.1 to 6.18 only: check fs/internal.h of this kernel, then widen the LINUX_VERSION_CODE range in filewatcher.c"
#endif

#if !defined(CONFIG_X86_64) && !defined(CONFIG_ARM64)
#error "filewatcher reads do_filp_open() arguments from registers: only x86_64 and arm64 are supported"
#endif

/*
 * The head of struct open_flags (fs/internal.h, not in the exported headers;
 * open_flag and mode have led the struct since it appeared in 2.6.35 and still
 * do in 6.1 and 6.11):
 *	struct open_flags { int open_flag; umode_t mode; int acc_mode; int intent; int lookup_flags; };
 * Only these two fields are read.
 */
struct filewatcher_open_flags_head {
	int open_flag;
	umode_t mode;
};

/* Carried from the entry handler to the return handler (kretprobe data_size). */
struct filewatcher_call {
	unsigned int flags;
	umode_t mode;
};

/* d_path() needs a PATH_MAX buffer: too big for a kprobe handler's stack. */
struct filewatcher_path_buf {
	char buf[PATH_MAX];
};
static struct filewatcher_path_buf __percpu *filewatcher_bufs;
static struct dentry *filewatcher_dir;

/*
 * Argument @n of the probed function, at its entry. The kernel's calling
 * convention passes the first arguments in registers: x86_64 di, si, dx, cx,
 * r8, r9; arm64 x0-x7. regs_get_kernel_argument() (asm/ptrace.h of both)
 * implements exactly that, so the per-architecture code is one line each:
 * x86_64 regs->dx and arm64 regs->regs[2] for n == 2.
 */
static unsigned long filewatcher_arg(struct pt_regs *regs, unsigned int n)
{
	return regs_get_kernel_argument(regs, n);
}

/* do_filp_open(int dfd, struct filename *pathname, const struct open_flags *op), 6.1 */
static int filewatcher_entry(struct kretprobe_instance *ri, struct pt_regs *regs)
{
	const struct filewatcher_open_flags_head *op = (const void *)filewatcher_arg(regs, 2);
	struct filewatcher_call *call = (struct filewatcher_call *)ri->data;

	if (!op || !(op->open_flag & O_CREAT))
		return 1; /* non-zero: no return handler for this call */
	call->flags = op->open_flag;
	/* build_open_flags() stores S_IFREG | the asked permissions: keep the permissions. */
	call->mode = op->mode & S_IALLUGO;
	return 0;
}

static int filewatcher_return(struct kretprobe_instance *ri, struct pt_regs *regs)
{
	struct file *file = (struct file *)regs_return_value(regs);
	const struct filewatcher_call *call = (const struct filewatcher_call *)ri->data;
	struct ktel_kv labels[1];
	char *buf, *path;

	if (IS_ERR_OR_NULL(file) || !(file->f_mode & FMODE_CREATED))
		return 0;

	labels[0].key = "fs";
	labels[0].value = file_inode(file)->i_sb->s_type->name;
	ktel_counter_add("filewatcher_files_created_total", labels, ARRAY_SIZE(labels), 1);

	if (!trace_file_created_enabled())
		return 0;
	/* kretprobe handlers run with preemption disabled and do not nest (kprobe_running()). */
	buf = this_cpu_ptr(filewatcher_bufs)->buf;
	path = d_path(&file->f_path, buf, PATH_MAX);
	if (IS_ERR(path))
		/*
		 * -ENAMETOOLONG: deeper than PATH_MAX. Not absolute, so a reader tells it
		 * from a path; the agent's program counts it and sends it as it is, never
		 * resolved against the process's cwd (bpf/file_created.bpf.c).
		 */
		path = "(d_path failed)";
	trace_file_created(current->tgid, current->comm, call->flags, call->mode, path,
			   strlen(path));
	return 0;
}

static struct kretprobe filewatcher_probe = {
	.kp.symbol_name = "do_filp_open",
	.entry_handler = filewatcher_entry,
	.handler = filewatcher_return,
	.data_size = sizeof(struct filewatcher_call),
};

static int filewatcher_missed_get(void *data, u64 *val)
{
	*val = READ_ONCE(filewatcher_probe.nmissed);
	return 0;
}
DEFINE_DEBUGFS_ATTRIBUTE(filewatcher_missed_fops, filewatcher_missed_get, NULL, "%llu\n");

static int __init filewatcher_init(void)
{
	int ret;

	filewatcher_bufs = alloc_percpu(struct filewatcher_path_buf);
	if (!filewatcher_bufs)
		return -ENOMEM;
	/*
	 * do_filp_open() sleeps, so many calls can be in flight at once; each
	 * needs an instance (the default is 2 * CPUs, at least 10).
	 */
	filewatcher_probe.maxactive = max_t(int, 64, 8 * num_possible_cpus());
	ret = register_kretprobe(&filewatcher_probe);
	if (ret) {
		pr_err("filewatcher: cannot probe %s: %d\n", filewatcher_probe.kp.symbol_name, ret);
		free_percpu(filewatcher_bufs);
		return ret;
	}
	filewatcher_dir = debugfs_create_dir("filewatcher", NULL);
	debugfs_create_file_unsafe("missed", 0444, filewatcher_dir, NULL, &filewatcher_missed_fops);
	return 0;
}

static void __exit filewatcher_exit(void)
{
	debugfs_remove_recursive(filewatcher_dir);
	/* Waits until no handler runs (and none will), so the buffers can go. */
	unregister_kretprobe(&filewatcher_probe);
	free_percpu(filewatcher_bufs);
}

module_init(filewatcher_init);
module_exit(filewatcher_exit);

MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("filewatcher: filewatcher:file_created for every file an open really created");
