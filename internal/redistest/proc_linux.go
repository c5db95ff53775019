package redistest

import (
	"os"
	"os/exec"
	"syscall"
)

// setChildAttrs makes the kernel kill a test's redis-server when the test
// binary dies, even by a panic or SIGKILL, so no server outlives the run.
func setChildAttrs(cmd *exec.Cmd) {
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true}
}

func pauseProcess(p *os.Process) error  { return p.Signal(syscall.SIGSTOP) }
func resumeProcess(p *os.Process) error { return p.Signal(syscall.SIGCONT) }
