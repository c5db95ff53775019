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
	r, err := parseWrk(wrkOK)
	if err != nil || r.Requests != 342846 || r.RPS != 68569.20 || r.broken() {
		t.Fatalf("ok output: %+v, %v", r, err)
	}
	r, err = parseWrk(wrkBroken)
	if err != nil || r.Non2xx3xx != 99990 || r.SocketErrors != "connect 0, read 3, write 0, timeout 0" || !r.broken() {
		t.Fatalf("broken output: %+v, %v", r, err)
	}
	if _, err := parseWrk("unable to connect to 127.0.0.1:1 Connection refused"); err == nil {
		t.Fatal("garbage parsed")
	}
}

func TestReportMarksBrokenCases(t *testing.T) {
	ok, _ := parseWrk(wrkOK)
	bad, _ := parseWrk(wrkBroken)
	entries := []*entry{
		{Case: Case{Name: "baseline /n", Baseline: "/n"}, runs: []runResult{{wrkResult: ok}, {wrkResult: ok}}},
		{Case: Case{Name: "x/write", Baseline: "/n"}, runs: []runResult{{wrkResult: ok, Commands: 2 * ok.Requests}, {wrkResult: bad, Commands: 2 * bad.Requests}}},
	}
	var buf bytes.Buffer
	o := options{duration: defaultDuration, rounds: defaultRounds, conns: defaultConns, cases: regexp.MustCompile("")}
	n := report(&buf, header{Options: o, Date: time.Now()}, entries)
	out := buf.String()
	if n != 1 {
		t.Errorf("broken = %d, want 1", n)
	}
	for _, want := range []string{
		"| baseline /n | 68,569 | 1.00 × /n | 0.00 |",
		"| x/write ⚠ [1] | ⚠ 44,285 | ⚠ invalid (0.65 × /n) | 2.00 |",
		"[1] x/write had errors, its figures are invalid — round 2: 99990 non-2xx/3xx of 100000 requests; socket errors: connect 0, read 3, write 0, timeout 0",
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
