//go:build !unix

package redistest

import (
	"errors"
	"os"
	"os/exec"
)

// setChildAttrs does nothing here: the test binary stops the servers itself
// (Run, Topology.Close).
func setChildAttrs(*exec.Cmd) {}

var errNoPause = errors.New("redistest: pausing a process needs SIGSTOP, which this platform lacks")

func pauseProcess(*os.Process) error  { return errNoPause }
func resumeProcess(*os.Process) error { return errNoPause }
