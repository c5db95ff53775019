package main

import (
	"bytes"
	"regexp"
	"strings"
	"testing"
	"time"
)

const wrkOK = `Running 5s test @ http://127.0.0.1:4000/n
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   461.20us  120.11us   4.12ms   90.10%
    Req/Sec    68.90k     2.10k   71.00k    84.00%
  342846 requests in 5.00s, 41.20MB read
Requests/sec:  68569.20
Transfer/sec:      8.24MB
`

const wrkBroken = `Running 5s test @ http://127.0.0.1:4000/x
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   461.20us  120.11us   4.12ms   90.10%
    Req/Sec    68.90k     2.10k   71.00k    84.00%
  100000 requests in 5.00s, 41.20MB read
  Socket errors: connect 0, read 3, write 0, timeout 0
  Non-2xx or 3xx responses: 99990
Requests/sec:  20000.00
Transfer/sec:      8.24MB
`

func TestParseWrk(t *testing.T) {
	r, err := parseWrk(wrkOK, 0)
	if err != nil || r.Requests != 342846 || r.RPS != 68569.20 || r.broken() {
		t.Fatalf("ok output: %+v, %v", r, err)
	}
	r, err = parseWrk(wrkBroken, 0)
	if err != nil || r.Non2xx3xx != 99990 || r.SocketErrors != "connect 0, read 3, write 0, timeout 0" || !r.broken() {
		t.Fatalf("broken output: %+v, %v", r, err)
	}
	if _, err := parseWrk("unable to connect to 127.0.0.1:1 Connection refused", 0); err == nil {
		t.Fatal("garbage parsed")
	}
}

// wrkExpect is the output of a run with the expectScript of 429: every
// response was 429, which wrk itself counts as non-2xx/3xx.
const wrkExpect = `Running 5s test @ http://127.0.0.1:4000/limited
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   461.20us  120.11us   4.12ms   90.10%
    Req/Sec    68.90k     2.10k   71.00k    84.00%
  342846 requests in 5.00s, 41.20MB read
  Non-2xx or 3xx responses: 342846
Requests/sec:  68569.20
Transfer/sec:      8.24MB
Unexpected statuses (want 429): 0 []
`

func TestParseWrkExpect(t *testing.T) {
	r, err := parseWrk(wrkExpect, 429)
	if err != nil || r.Requests != 342846 || r.Non2xx3xx != 342846 || r.Unexpected != 0 || r.broken() {
		t.Fatalf("all 429: %+v, %v", r, err)
	}
	bad := strings.Replace(wrkExpect, "(want 429): 0 []", "(want 429): 12 [200 500]", 1)
	r, err = parseWrk(bad, 429)
	if err != nil || r.Unexpected != 12 || r.UnexpectedStatuses != "200 500" || !r.broken() {
		t.Fatalf("some not 429: %+v, %v", r, err)
	}
	if got, want := r.badDescription(), "not 429 (got 200 500)"; got != want {
		t.Errorf("badDescription = %q, want %q", got, want)
	}
	// Without the script's line (it did not run), or for another status,
	// the run cannot be judged.
	if _, err := parseWrk(wrkOK, 429); err == nil {
		t.Error("output without the script's line parsed")
	}
	if _, err := parseWrk(wrkExpect, 503); err == nil {
		t.Error("count of another status accepted")
	}
	// Without an expected status the script's line is ignored and wrk's own
	// count decides.
	if r, err := parseWrk(wrkExpect, 0); err != nil || !r.broken() {
		t.Errorf("no expected status: %+v, %v", r, err)
	}
}

func TestReportMarksBrokenCases(t *testing.T) {
	ok, _ := parseWrk(wrkOK, 0)
	bad, _ := parseWrk(wrkBroken, 0)
	limited, _ := parseWrk(wrkExpect, 429)
	limitedBad, _ := parseWrk(strings.Replace(wrkExpect, "0 []", "7 [500]", 1), 429)
	entries := []*entry{
		{Case: Case{Name: "baseline /n", Baseline: "/n"}, runs: []runResult{{wrkResult: ok}, {wrkResult: ok}}},
		{Case: Case{Name: "x/write", Baseline: "/n"}, runs: []runResult{{wrkResult: ok, Commands: 2 * ok.Requests}, {wrkResult: bad, Commands: 2 * bad.Requests}}},
		{Case: Case{Name: "x/limited", Baseline: "/n", Status: 429}, runs: []runResult{{wrkResult: limited}, {wrkResult: limitedBad}}},
		{Case: Case{Name: "x/rejected", Baseline: "/n", Status: 429}, runs: []runResult{{wrkResult: limited}, {wrkResult: limited}}},
	}
	var buf bytes.Buffer
	o := options{duration: defaultDuration, rounds: defaultRounds, conns: defaultConns, cases: regexp.MustCompile("")}
	n := report(&buf, header{Options: o, Date: time.Now()}, entries)
	out := buf.String()
	if n != 2 {
		t.Errorf("broken = %d, want 2", n)
	}
	for _, want := range []string{
		"| baseline /n | 68,569 | 1.00 × /n | 0.00 |",
		"| x/write ⚠ [1] | ⚠ 44,285 | ⚠ invalid (0.65 × /n) | 2.00 |",
		"[1] x/write had errors, its figures are invalid — round 2: 99990 non-2xx/3xx of 100000 requests; socket errors: connect 0, read 3, write 0, timeout 0",
		"| x/limited ⚠ [2] | ⚠ 68,569 | ⚠ invalid (1.00 × /n) | 0.00 |",
		"[2] x/limited had errors, its figures are invalid — round 2: 7 not 429 (got 500) of 342846 requests",
		"| x/rejected | 68,569 | 1.00 × /n | 0.00 |",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("missing %q in:\n%s", want, out)
		}
	}
	if strings.Contains(out, "Not the method") {
		t.Errorf("default options reported as a smoke run:\n%s", out)
	}
}

func TestMedian(t *testing.T) {
	for _, c := range []struct {
		in   []float64
		want float64
	}{{[]float64{3}, 3}, {[]float64{4, 2}, 3}, {[]float64{5, 1, 3}, 3}, {nil, 0}} {
		if got := median(c.in); got != c.want {
			t.Errorf("median(%v) = %v, want %v", c.in, got, c.want)
		}
	}
}
