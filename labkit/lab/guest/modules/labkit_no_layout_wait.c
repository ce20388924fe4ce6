// SPDX-License-Identifier: GPL-2.0
/*
 * labkit_no_layout_wait - the world before v4.18 (XFS) and v4.19 (ext4).
 *
 * Before truncate or hole punch frees the blocks of a DAX file, the filesystem
 * asks dax_layout_busy_page{,_range}() for a page of the mapping that someone
 * (a DMA engine, a pipe) still references, and sleeps until it is idle
 * (xfs_break_dax_layouts(), ext4_break_layouts()). This module makes both
 * functions answer NULL, "nothing is busy": the filesystem frees the blocks at
 * once, while a device may still write to them. For a throwaway lab guest only.
 */
#include <linux/kprobes.h>
#include <linux/mm.h>
#include <linux/module.h>
#include <linux/ptrace.h>

static atomic_t overrides = ATOMIC_INIT(0);

static int busy_return(struct kretprobe_instance *ri, struct pt_regs *regs)
{
	struct page *page = (struct page *)regs_return_value(regs);

	if (!page)
		return 0;
	regs_set_return_value(regs, 0);	/* "no DAX page is busy" */
	atomic_inc(&overrides);
	pr_warn_ratelimited("labkit_no_layout_wait: told %s[%d] that busy DAX page pfn %#lx is idle\n",
			    current->comm, task_pid_nr(current), page_to_pfn(page));
	return 0;
}

static struct kretprobe busy_probes[] = {
	{ .kp.symbol_name = "dax_layout_busy_page", .handler = busy_return, .maxactive = 32 },
	{ .kp.symbol_name = "dax_layout_busy_page_range", .handler = busy_return, .maxactive = 32 },
};
static bool registered[ARRAY_SIZE(busy_probes)];

static int get_overrides(char *buf, const struct kernel_param *kp)
{
	return sysfs_emit(buf, "%d\n", atomic_read(&overrides));
}

static const struct kernel_param_ops overrides_ops = { .get = get_overrides };
module_param_cb(overrides, &overrides_ops, NULL, 0444);
MODULE_PARM_DESC(overrides, "how many busy pages were reported as idle");

static int __init no_layout_wait_init(void)
{
	int i, err = -ENOENT, n = 0;

	for (i = 0; i < ARRAY_SIZE(busy_probes); i++) {
		err = register_kretprobe(&busy_probes[i]);
		if (err) {
			pr_warn("labkit_no_layout_wait: %s cannot be probed on this kernel (error %d)\n",
				busy_probes[i].kp.symbol_name, err);
			continue;
		}
		registered[i] = true;
		n++;
	}
	if (!n) {
		pr_err("labkit_no_layout_wait: none of the DAX layout checks exists on this kernel: not loaded\n");
		return err;
	}
	pr_warn("labkit_no_layout_wait: loaded: truncate no longer waits for busy DAX pages\n");
	return 0;
}

static void __exit no_layout_wait_exit(void)
{
	int i;

	for (i = 0; i < ARRAY_SIZE(busy_probes); i++)
		if (registered[i])
			unregister_kretprobe(&busy_probes[i]);
	pr_warn("labkit_no_layout_wait: unloaded after %d overrides: truncate waits again\n",
		atomic_read(&overrides));
}

module_init(no_layout_wait_init);
module_exit(no_layout_wait_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("labkit: dax_layout_busy_page() always answers NULL (teaching only)");
