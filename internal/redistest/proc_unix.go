//go:build unix && !linux

package redistest

import (
	"os"
	"os/exec"
	"syscall"
)

// setChildAttrs puts a test's redis-server in its own process group. Outside
// Linux there is no parent-death signal: the test binary stops the servers
// itself (Run, Topology.Close).
func setChildAttrs(cmd *exec.Cmd) {
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
}

func pauseProcess(p *os.Process) error  { return p.Signal(syscall.SIGSTOP) }
func resumeProcess(p *os.Process) error { return p.Signal(syscall.SIGCONT) }
