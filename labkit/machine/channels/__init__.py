"""The three ways into a guest: the serial console (pexpect), commands over
SSH (paramiko) and machine control over QMP (qemu.qmp). No paramiko or
qemu.qmp type leaves this package."""
