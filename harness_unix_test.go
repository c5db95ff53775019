//go:build unix && !linux

package redisecho

import (
	"os/exec"
	"syscall"
)

var sigStop, sigCont = syscall.SIGSTOP, syscall.SIGCONT

// setChildAttrs puts a test's redis-server in its own process group. Outside
// Linux there is no parent-death signal: TestMain stops the servers itself.
func setChildAttrs(cmd *exec.Cmd) {
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
}
