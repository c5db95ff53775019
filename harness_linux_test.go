package redisecho

import (
	"os/exec"
	"syscall"
)

var sigStop, sigCont = syscall.SIGSTOP, syscall.SIGCONT

// setChildAttrs makes the kernel kill a test's redis-server when the test
// binary dies, even by a panic or SIGKILL, so no server outlives the run.
func setChildAttrs(cmd *exec.Cmd) {
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true}
}
