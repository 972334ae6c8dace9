// SPDX-License-Identifier: GPL-2.0
/* ktel_sample.c - sample user of the ktel API: nested spans, a counter, a histogram, a log. */

/*
 * Writing N to /sys/kernel/debug/ktel_sample/fire runs the sample operation N
 * times. Each run emits, while the ktel:* events are enabled:
 *   ktel_span_begin x2, ktel_span_end x2  ("ktel_sample.operation" and its
 *                                          child "ktel_sample.checksum"; each
 *                                          end carries its begin's attributes
 *                                          and its own)
 *   ktel_counter x1    ktel_sample_operations_total{result="ok"} += 1
 *   ktel_histogram x1  ktel_sample_operation_duration_ns <- the duration
 *   ktel_log x1        WARN in the operation's span, when the operation took
 *                      longer than warn_over_ns (default 0: every time, so
 *                      that one write shows every kind of event)
 *
 * Writing N to /sys/kernel/debug/ktel_sample/fire_longest emits N ktel_counter
 * events (value 1) whose name, label key and label value are each as long as
 * the API keeps (KTEL_NAME_MAX_LEN, KTEL_KV_MAX_LEN), in buffers of exactly
 * that size with no NUL. The API reads no byte past them (<ktel/ktel.h>);
 * /sys/kernel/debug/ktel_sample/longest_overreads counts the accesses to the
 * byte after each.
 *
 * Writing N to /sys/kernel/debug/ktel_sample/fire_span_attrs emits N times the
 * five root spans of ktel_sample_span_attrs(), each with attributes given in
 * another way (at begin, at end, both, more than fit, from a buffer reused
 * before the end), to show which the finished span carries.
 */

#include <linux/debugfs.h>
#include <linux/fs.h>
#include <linux/hw_breakpoint.h>
#include <linux/jhash.h>
#include <linux/kernel.h>
#include <linux/module.h>
#include <linux/moduleparam.h>
#include <linux/sched.h>
#include <linux/timekeeping.h>
#include <linux/uaccess.h>
#include <ktel/ktel.h>

#define KTEL_SAMPLE_MAX_FIRE 100000 /* runs per write, so one write cannot stall for long */

static ulong warn_over_ns;
module_param(warn_over_ns, ulong, 0644);
MODULE_PARM_DESC(warn_over_ns, "log a warning when an operation takes longer (ns; 0: always)");

static struct dentry *ktel_sample_dir;
static u8 ktel_sample_buf[4096];

/*
 * What is known when a span starts goes to ktel_span_begin(), what is known at
 * its end (the result) to ktel_span_end(): the finished span, ktel_span_end's
 * event and the one the agent exports, carries both (<ktel/ktel.h>).
 */
static const struct ktel_kv op_attrs[] = {
	{ "code.namespace", "ktel_sample" },
	{ "ktel_sample.trigger", "debugfs" },
};
static const struct ktel_kv op_end_attrs[] = {
	{ "ktel_sample.result", "ok" },
};
static const struct ktel_kv step_attrs[] = {
	{ "ktel_sample.algorithm", "jhash" },
};
static const struct ktel_kv ok_labels[] = {
	{ "result", "ok" },
};

/* The "work": hash a buffer, in a child span of the operation's span. */
static u32 ktel_sample_checksum(const struct ktel_span *parent, u32 seed)
{
	struct ktel_span step;
	u32 sum;

	ktel_span_begin(&step, "ktel_sample.checksum", &parent->ctx, step_attrs,
			ARRAY_SIZE(step_attrs));
	sum = jhash(ktel_sample_buf, sizeof(ktel_sample_buf), seed);
	ktel_span_end(&step, KTEL_SPAN_STATUS_OK, NULL, 0);
	return sum;
}

static void ktel_sample_operation(unsigned int seq)
{
	struct ktel_span op;
	u64 t0, dur;
	u32 sum;

	t0 = ktime_get_ns();
	ktel_span_begin(&op, "ktel_sample.operation", NULL, op_attrs, ARRAY_SIZE(op_attrs));
	sum = ktel_sample_checksum(&op, seq);
	/* Feed the result back so the compiler cannot drop the work. */
	ktel_sample_buf[seq % sizeof(ktel_sample_buf)] ^= (u8)sum;
	dur = ktime_get_ns() - t0;

	ktel_counter_add("ktel_sample_operations_total", ok_labels, ARRAY_SIZE(ok_labels), 1);
	ktel_histogram_observe("ktel_sample_operation_duration_ns", NULL, 0, dur);
	if (dur > warn_over_ns)
		ktel_log(KTEL_SEV_WARN, &op.ctx, op_attrs, 1,
			 "operation %u took %llu ns (warn_over_ns %lu)", seq, dur, warn_over_ns);
	ktel_span_end(&op, KTEL_SPAN_STATUS_OK, op_end_attrs, ARRAY_SIZE(op_end_attrs));
}

/* One span named @name, @begin[@nb] given to its begin and @end[@ne] to its end. */
static void ktel_sample_attr_span(const char *name, const struct ktel_kv *begin, unsigned int nb,
				  const struct ktel_kv *end, unsigned int ne)
{
	struct ktel_span span;

	ktel_span_begin(&span, name, NULL, begin, nb);
	ktel_span_end(&span, KTEL_SPAN_STATUS_OK, end, ne);
}

static void ktel_sample_span_attrs(unsigned int seq)
{
	static const struct ktel_kv begin_only[] = { { "at", "begin" } };
	static const struct ktel_kv end_only[] = { { "at", "end" } };
	static const struct ktel_kv both_begin[] = { { "from", "begin" }, { "shared", "begin" } };
	static const struct ktel_kv both_end[] = { { "shared", "end" }, { "to", "end" } };
	static const struct ktel_kv full_begin[] = {
		{ "k0", "begin" }, { "k1", "begin" }, { "k2", "begin" }, { "k3", "begin" }
	};
	static const struct ktel_kv full_end[] = { { "k4", "end" }, { "k1", "end" } };
	struct ktel_span span;
	char value[80];
	struct ktel_kv reused = { "value", value };

	ktel_sample_attr_span("ktel_sample.attrs.begin", begin_only, 1, NULL, 0);
	ktel_sample_attr_span("ktel_sample.attrs.end", NULL, 0, end_only, 1);
	ktel_sample_attr_span("ktel_sample.attrs.both", both_begin, 2, both_end, 2);
	ktel_sample_attr_span("ktel_sample.attrs.full", full_begin, 4, full_end, 2);
	/*
	 * begin's value is longer than KTEL_KV_MAX_LEN, and its buffer is
	 * overwritten before the end: the span emits the copy begin kept, cut.
	 */
	memset(value, 'b', sizeof(value) - 1);
	value[sizeof(value) - 1] = '\0';
	ktel_span_begin(&span, "ktel_sample.attrs.copied", NULL, &reused, 1);
	strscpy(value, "overwritten", sizeof(value));
	ktel_span_end(&span, KTEL_SPAN_STATUS_OK, NULL, 0);
}

/*
 * fire_longest's name, label key and label value, each with no NUL, and after
 * each a byte that nothing reads, watched on every CPU by a hardware
 * breakpoint (read or write: x86 has no read-only one) that counts the
 * accesses in longest_overreads.
 */
static struct {
	char name[KTEL_NAME_MAX_LEN];
	char past_name;
	char key[KTEL_KV_MAX_LEN];
	char past_key;
	char value[KTEL_KV_MAX_LEN];
	char past_value;
} longest;
static struct perf_event *__percpu *longest_watches[3];
static atomic_t longest_overreads;

static void longest_overread(struct perf_event *bp, struct perf_sample_data *data,
			     struct pt_regs *regs)
{
	atomic_inc(&longest_overreads);
}

static int longest_watch(unsigned int i, char *byte)
{
	struct perf_event_attr attr;
	struct perf_event *__percpu *w;

	hw_breakpoint_init(&attr);
	attr.bp_addr = (unsigned long)byte;
	attr.bp_len = HW_BREAKPOINT_LEN_1;
	attr.bp_type = HW_BREAKPOINT_RW;
	w = register_wide_hw_breakpoint(&attr, longest_overread, NULL);
	if (IS_ERR(w))
		return PTR_ERR(w);
	longest_watches[i] = w;
	return 0;
}

static void longest_unwatch(void)
{
	unsigned int i;

	for (i = 0; i < ARRAY_SIZE(longest_watches); i++)
		if (longest_watches[i])
			unregister_wide_hw_breakpoint(longest_watches[i]);
}

/* @s, @len bytes: @prefix, then @fill to the end, no NUL. */
static void longest_fill(char *s, size_t len, const char *prefix, char fill)
{
	memset(s, fill, len);
	memcpy(s, prefix, strlen(prefix));
}

/* 0, or why the bytes after the strings are not watched (then nothing counts). */
static int longest_init(void)
{
	int ret;

	longest_fill(longest.name, sizeof(longest.name), "ktel_sample_longest_name_", 'n');
	longest_fill(longest.key, sizeof(longest.key), "longest_key_", 'k');
	longest_fill(longest.value, sizeof(longest.value), "longest_value_", 'v');
	ret = longest_watch(0, &longest.past_name);
	if (!ret)
		ret = longest_watch(1, &longest.past_key);
	if (!ret)
		ret = longest_watch(2, &longest.past_value);
	if (ret) {
		longest_unwatch();
		memset(longest_watches, 0, sizeof(longest_watches));
	}
	return ret;
}

static void ktel_sample_longest(unsigned int seq)
{
	const struct ktel_kv label = { longest.key, longest.value };

	ktel_counter_add(longest.name, &label, 1, 1);
}

/* A write of N runs @op N times. */
static ssize_t fire_n(const char __user *ubuf, size_t len, void (*op)(unsigned int))
{
	unsigned int n, i;
	int ret;

	ret = kstrtouint_from_user(ubuf, len, 0, &n);
	if (ret)
		return ret;
	if (n > KTEL_SAMPLE_MAX_FIRE)
		return -EINVAL;
	for (i = 0; i < n; i++) {
		op(i);
		cond_resched();
	}
	return len;
}

static ssize_t fire_write(struct file *file, const char __user *ubuf, size_t len, loff_t *ppos)
{
	return fire_n(ubuf, len, ktel_sample_operation);
}

static ssize_t fire_longest_write(struct file *file, const char __user *ubuf, size_t len,
				  loff_t *ppos)
{
	return fire_n(ubuf, len, ktel_sample_longest);
}

static ssize_t fire_span_attrs_write(struct file *file, const char __user *ubuf, size_t len,
				     loff_t *ppos)
{
	return fire_n(ubuf, len, ktel_sample_span_attrs);
}

static const struct file_operations fire_span_attrs_fops = {
	.owner = THIS_MODULE,
	.open = simple_open,
	.write = fire_span_attrs_write,
	.llseek = noop_llseek,
};

static const struct file_operations fire_fops = {
	.owner = THIS_MODULE,
	.open = simple_open,
	.write = fire_write,
	.llseek = noop_llseek,
};

static const struct file_operations fire_longest_fops = {
	.owner = THIS_MODULE,
	.open = simple_open,
	.write = fire_longest_write,
	.llseek = noop_llseek,
};

static int __init ktel_sample_init(void)
{
	/* No breakpoint to spare (or none on this kernel): no count, rather than a false 0. */
	int watch_err = longest_init();

	if (watch_err)
		pr_info("ktel_sample: longest_overreads not counted: no hardware breakpoint (%d)\n",
			watch_err);
	ktel_sample_dir = debugfs_create_dir("ktel_sample", NULL);
	/* debugfs returns ERR_PTR on failure (e.g. debugfs disabled); the module is useless then. */
	if (IS_ERR(ktel_sample_dir)) {
		longest_unwatch();
		return PTR_ERR(ktel_sample_dir);
	}
	debugfs_create_file("fire", 0200, ktel_sample_dir, NULL, &fire_fops);
	debugfs_create_file("fire_longest", 0200, ktel_sample_dir, NULL, &fire_longest_fops);
	debugfs_create_file("fire_span_attrs", 0200, ktel_sample_dir, NULL, &fire_span_attrs_fops);
	if (!watch_err)
		debugfs_create_atomic_t("longest_overreads", 0400, ktel_sample_dir,
					&longest_overreads);
	return 0;
}

static void __exit ktel_sample_exit(void)
{
	debugfs_remove_recursive(ktel_sample_dir);
	longest_unwatch();
}

module_init(ktel_sample_init);
module_exit(ktel_sample_exit);

MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("ktel_sample: spans, a counter, a histogram and a log through the ktel API");
