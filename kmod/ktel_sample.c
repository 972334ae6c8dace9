// SPDX-License-Identifier: GPL-2.0
/* ktel_sample.c - sample user of the ktel API: nested spans, a counter, a histogram, a log. */

/*
 * Writing N to /sys/kernel/debug/ktel_sample/fire runs the sample operation N
 * times. Each run emits, while the ktel:* events are enabled:
 *   ktel_span_begin x2, ktel_span_end x2  ("ktel_sample.operation" and its
 *                                          child "ktel_sample.checksum")
 *   ktel_counter x1    ktel_sample_operations_total{result="ok"} += 1
 *   ktel_histogram x1  ktel_sample_operation_duration_ns <- the duration
 *   ktel_log x1        WARN in the operation's span, when the operation took
 *                      longer than warn_over_ns (default 0: every time, so
 *                      that one write shows every kind of event)
 */

#include <linux/debugfs.h>
#include <linux/fs.h>
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

static const struct ktel_kv op_attrs[] = {
	{ "code.namespace", "ktel_sample" },
	{ "ktel_sample.trigger", "debugfs" },
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
	ktel_span_end(&op, KTEL_SPAN_STATUS_OK, NULL, 0);
}

static ssize_t fire_write(struct file *file, const char __user *ubuf, size_t len, loff_t *ppos)
{
	unsigned int n, i;
	int ret;

	ret = kstrtouint_from_user(ubuf, len, 0, &n);
	if (ret)
		return ret;
	if (n > KTEL_SAMPLE_MAX_FIRE)
		return -EINVAL;
	for (i = 0; i < n; i++) {
		ktel_sample_operation(i);
		cond_resched();
	}
	return len;
}

static const struct file_operations fire_fops = {
	.owner = THIS_MODULE,
	.open = simple_open,
	.write = fire_write,
	.llseek = noop_llseek,
};

static int __init ktel_sample_init(void)
{
	ktel_sample_dir = debugfs_create_dir("ktel_sample", NULL);
	/* debugfs returns ERR_PTR on failure (e.g. debugfs disabled); the module is useless then. */
	if (IS_ERR(ktel_sample_dir))
		return PTR_ERR(ktel_sample_dir);
	debugfs_create_file("fire", 0200, ktel_sample_dir, NULL, &fire_fops);
	return 0;
}

static void __exit ktel_sample_exit(void)
{
	debugfs_remove_recursive(ktel_sample_dir);
}

module_init(ktel_sample_init);
module_exit(ktel_sample_exit);

MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("ktel_sample: spans, a counter, a histogram and a log through the ktel API");
