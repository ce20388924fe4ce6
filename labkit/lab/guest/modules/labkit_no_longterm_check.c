// SPDX-License-Identifier: GPL-2.0
/*
 * labkit_no_longterm_check - the lab's "what if the check were not there".
 *
 * Since v4.15 the kernel refuses a long-term pin (FOLL_LONGTERM: RDMA memory
 * registration, V4L2 USERPTR, ...) of a file mapping on a filesystem-DAX mount;
 * since v5.11 the refusal lives in check_vma_flags() in mm/gup.c:
 *
 *	if ((gup_flags & FOLL_LONGTERM) && vma_is_fsdax(vma))
 *		return -EOPNOTSUPP;
 *
 * This module puts a kretprobe on check_vma_flags() and turns exactly that
 * answer into 0: -EOPNOTSUPP, FOLL_LONGTERM, an fs-dax VMA, and (for a write
 * pin) a writable VMA. Every other answer is left alone. For a throwaway lab
 * guest only: it taints the kernel, and unloading it restores the rule.
 */
#include <linux/fs.h>
#include <linux/kprobes.h>
#include <linux/mm.h>
#include <linux/module.h>
#include <linux/ptrace.h>

#define TARGET "check_vma_flags"

struct cvf_call {
	struct vm_area_struct *vma;
	unsigned long gup_flags;
};

static atomic_t overrides = ATOMIC_INIT(0);

static int cvf_entry(struct kretprobe_instance *ri, struct pt_regs *regs)
{
	struct cvf_call *call = (struct cvf_call *)ri->data;

	call->vma = (struct vm_area_struct *)regs_get_kernel_argument(regs, 0);
	call->gup_flags = regs_get_kernel_argument(regs, 1);
	return 0;
}

static int cvf_return(struct kretprobe_instance *ri, struct pt_regs *regs)
{
	struct cvf_call *call = (struct cvf_call *)ri->data;

	if ((int)regs_return_value(regs) != -EOPNOTSUPP)
		return 0;
	if (!(call->gup_flags & FOLL_LONGTERM) || !vma_is_fsdax(call->vma))
		return 0;
	if ((call->gup_flags & FOLL_WRITE) && !(call->vma->vm_flags & VM_WRITE))
		return 0;
	regs_set_return_value(regs, 0);	/* the pin goes ahead */
	atomic_inc(&overrides);
	pr_warn_ratelimited("labkit_no_longterm_check: allowed a long-term pin of fs-dax memory (%s[%d])\n",
			    current->comm, task_pid_nr(current));
	return 0;
}

static struct kretprobe cvf_probe = {
	.kp.symbol_name = TARGET,
	.entry_handler = cvf_entry,
	.handler = cvf_return,
	.data_size = sizeof(struct cvf_call),
	.maxactive = 32,
};

static int get_overrides(char *buf, const struct kernel_param *kp)
{
	return sysfs_emit(buf, "%d\n", atomic_read(&overrides));
}

static const struct kernel_param_ops overrides_ops = { .get = get_overrides };
module_param_cb(overrides, &overrides_ops, NULL, 0444);
MODULE_PARM_DESC(overrides, "how many refusals were turned into 0");

static int __init no_longterm_check_init(void)
{
	int err = register_kretprobe(&cvf_probe);

	if (err) {
		pr_err("labkit_no_longterm_check: cannot probe %s on this kernel (error %d): the rule is not where this module looks for it\n",
		       TARGET, err);
		return err;
	}
	pr_warn("labkit_no_longterm_check: loaded: long-term pins of fs-dax memory are no longer refused\n");
	return 0;
}

static void __exit no_longterm_check_exit(void)
{
	unregister_kretprobe(&cvf_probe);
	pr_warn("labkit_no_longterm_check: unloaded after %d overrides (%d probe hits missed): the rule is back\n",
		atomic_read(&overrides), cvf_probe.nmissed);
}

module_init(no_longterm_check_init);
module_exit(no_longterm_check_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("labkit: let FOLL_LONGTERM pins of fs-dax memory through (teaching only)");
