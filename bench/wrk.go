package main

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// wrkResult is what one wrk run reports.
type wrkResult struct {
	Requests     int64   // requests completed
	RPS          float64 // Requests/sec line
	Non2xx3xx    int64   // "Non-2xx or 3xx responses"
	SocketErrors string  // the "Socket errors:" line, empty if none
}

func (r wrkResult) broken() bool { return r.Non2xx3xx > 0 || r.SocketErrors != "" }

var (
	reRequests = regexp.MustCompile(`(?m)^\s*(\d+) requests in `)
	reRPS      = regexp.MustCompile(`(?m)^Requests/sec:\s+([0-9.]+)`)
	reNon2xx   = regexp.MustCompile(`(?m)^\s*Non-2xx or 3xx responses:\s+(\d+)`)
	reSockErr  = regexp.MustCompile(`(?m)^\s*Socket errors:\s*(.+)$`)
)

// wrkPath finds wrk or explains how to get it.
func wrkPath() (string, error) {
	p, err := exec.LookPath("wrk")
	if err != nil {
		return "", errors.New("wrk not found: the method uses wrk as load generator; install it with `apt-get install wrk`")
	}
	return p, nil
}

// wrkVersion returns e.g. "debian/4.1.0-3+b2" (wrk -v exits non-zero).
func wrkVersion(bin string) string {
	out, _ := exec.Command(bin, "-v").CombinedOutput()
	first, _, _ := strings.Cut(string(out), "\n")
	f := strings.Fields(first)
	if len(f) >= 2 && f[0] == "wrk" {
		return f[1]
	}
	return "unknown"
}

// wrkArgs builds the command line of one run (without the binary).
func wrkArgs(o options, url string, header http.Header, script string) []string {
	args := []string{"-t1", "-c" + strconv.Itoa(o.conns), "-d" + wrkDuration(o.duration)}
	keys := make([]string, 0, len(header))
	for k := range header {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		for _, v := range header[k] {
			args = append(args, "-H", k+": "+v)
		}
	}
	if script != "" {
		args = append(args, "-s", script)
	}
	return append(args, url)
}

// wrkDuration formats d as wrk wants it: whole seconds, "5s".
func wrkDuration(d time.Duration) string {
	return strconv.Itoa(int(d.Round(time.Second)/time.Second)) + "s"
}

// methodScript writes a Lua script setting wrk.method, for non-GET cases.
func methodScript(method string) (string, error) {
	f, err := os.CreateTemp("", "bench-wrk-*.lua")
	if err != nil {
		return "", err
	}
	_, err = fmt.Fprintf(f, "wrk.method = %q\n", method)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return f.Name(), err
}

// runWrk runs wrk once and parses its report.
func runWrk(ctx context.Context, bin string, args []string) (wrkResult, error) {
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL} // dies with the harness
	out, err := cmd.CombinedOutput()
	if ctx.Err() != nil {
		return wrkResult{}, ctx.Err()
	}
	if err != nil {
		return wrkResult{}, fmt.Errorf("wrk %s: %w\n%s", strings.Join(args, " "), err, out)
	}
	return parseWrk(string(out))
}

func parseWrk(out string) (wrkResult, error) {
	var r wrkResult
	m := reRequests.FindStringSubmatch(out)
	m2 := reRPS.FindStringSubmatch(out)
	if m == nil || m2 == nil {
		return r, fmt.Errorf("cannot parse wrk output:\n%s", out)
	}
	r.Requests, _ = strconv.ParseInt(m[1], 10, 64)
	r.RPS, _ = strconv.ParseFloat(m2[1], 64)
	if m := reNon2xx.FindStringSubmatch(out); m != nil {
		r.Non2xx3xx, _ = strconv.ParseInt(m[1], 10, 64)
	}
	if m := reSockErr.FindStringSubmatch(out); m != nil {
		r.SocketErrors = strings.TrimSpace(m[1])
	}
	return r, nil
}
