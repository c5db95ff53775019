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
	Non2xx3xx    int64   // "Non-2xx or 3xx responses" (wrk counts status >= 400)
	SocketErrors string  // the "Socket errors:" line, empty if none

	// Expect is the status every response had to have (Case.Status); 0
	// means wrk's own accounting: Non2xx3xx are the bad responses.
	Expect int
	// Unexpected, when Expect is set, is the number of responses with
	// another status, as the expectScript reported it.
	Unexpected int64
	// UnexpectedStatuses lists those statuses ("200 500"), when Expect is
	// set and Unexpected is not 0.
	UnexpectedStatuses string
}

// bad returns the number of responses that make the run broken: those with
// another status than Expect when it is set, non-2xx/3xx ones otherwise.
func (r wrkResult) bad() int64 {
	if r.Expect != 0 {
		return r.Unexpected
	}
	return r.Non2xx3xx
}

func (r wrkResult) broken() bool { return r.bad() > 0 || r.SocketErrors != "" }

// badDescription says what was wrong with the bad responses, for notes:
// "non-2xx/3xx", or "not 429 (got 200 500)".
func (r wrkResult) badDescription() string {
	if r.Expect == 0 {
		return "non-2xx/3xx"
	}
	d := "not " + strconv.Itoa(r.Expect)
	if r.UnexpectedStatuses != "" {
		d += " (got " + r.UnexpectedStatuses + ")"
	}
	return d
}

var (
	reRequests   = regexp.MustCompile(`(?m)^\s*(\d+) requests in `)
	reRPS        = regexp.MustCompile(`(?m)^Requests/sec:\s+([0-9.]+)`)
	reNon2xx     = regexp.MustCompile(`(?m)^\s*Non-2xx or 3xx responses:\s+(\d+)`)
	reSockErr    = regexp.MustCompile(`(?m)^\s*Socket errors:\s*(.+)$`)
	reUnexpected = regexp.MustCompile(`(?m)^Unexpected statuses \(want (\d+)\): (\d+) \[([0-9 ]*)\]$`)
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

// expectScript is the Lua of a case with a Status: it counts, in each
// thread, the responses whose status is not the expected one, and done
// prints their total and statuses in the line reUnexpected parses. Defining
// response makes wrk keep each response's headers and body for the
// callback, which costs wrk some CPU: only Status cases pay it.
const expectScript = `
local threads = {}
function setup(thread) table.insert(threads, thread) end
unexpected, seen = 0, ""
function response(status, headers, body)
  if status ~= expected then
    unexpected = unexpected + 1
    if not string.find(seen .. " ", " " .. status .. " ", 1, true) then seen = seen .. " " .. status end
  end
end
function done(summary, latency, requests)
  local n, set, list = 0, {}, {}
  for _, t in ipairs(threads) do
    n = n + t:get("unexpected")
    for s in string.gmatch(t:get("seen"), "%d+") do
      if not set[s] then set[s] = true; table.insert(list, tonumber(s)) end
    end
  end
  table.sort(list)
  io.write(string.format("Unexpected statuses (want %d): %d [%s]\n", expected, n, table.concat(list, " ")))
end
`

// wrkScript writes the Lua script of a case that needs one: it sets
// wrk.method (non-GET cases) and, when status is not 0, counts the
// responses with another status (expectScript).
func wrkScript(method string, status int) (string, error) {
	f, err := os.CreateTemp("", "bench-wrk-*.lua")
	if err != nil {
		return "", err
	}
	_, err = fmt.Fprintf(f, "wrk.method = %q\n", method)
	if err == nil && status != 0 {
		_, err = fmt.Fprintf(f, "expected = %d\n%s", status, expectScript)
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return f.Name(), err
}

// runWrk runs wrk once and parses its report; expect is the case's Status
// (see parseWrk).
func runWrk(ctx context.Context, bin string, args []string, expect int) (wrkResult, error) {
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL} // dies with the harness
	out, err := cmd.CombinedOutput()
	if ctx.Err() != nil {
		return wrkResult{}, ctx.Err()
	}
	if err != nil {
		return wrkResult{}, fmt.Errorf("wrk %s: %w\n%s", strings.Join(args, " "), err, out)
	}
	return parseWrk(string(out), expect)
}

// parseWrk reads wrk's report. With expect not 0, the run used the
// expectScript of that status, whose line must be there.
func parseWrk(out string, expect int) (wrkResult, error) {
	r := wrkResult{Expect: expect}
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
	if expect != 0 {
		m := reUnexpected.FindStringSubmatch(out)
		if m == nil {
			return r, fmt.Errorf("wrk output has no status count from the Lua script (want %d):\n%s", expect, out)
		}
		if m[1] != strconv.Itoa(expect) {
			return r, fmt.Errorf("wrk's Lua script counted statuses other than %s, want %d", m[1], expect)
		}
		r.Unexpected, _ = strconv.ParseInt(m[2], 10, 64)
		r.UnexpectedStatuses = m[3]
	}
	return r, nil
}
