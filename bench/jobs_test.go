package main

import (
	"bytes"
	"context"
	"regexp"
	"testing"
)

// TestJobsBenchSmoke runs the queue benchmark tiny (as -quick) against a
// throwaway redis-server and checks that it produced every row with
// plausible numbers. It measures nothing.
func TestJobsBenchSmoke(t *testing.T) {
	var out bytes.Buffer
	if err := runJobs(context.Background(), jobsOpts{n: 300, pickups: 5, rounds: 1, out: &out}); err != nil {
		t.Fatal(err)
	}
	table := out.String()
	for _, row := range []string{
		`\| drain, concurrency 10 \| [0-9]+/s \| [0-9]+/s \| [0-9.]+× \|`,
		`\| drain, concurrency 50 \| [0-9]+/s \| [0-9]+/s \| [0-9.]+× \|`,
		`\| enqueue one at a time \(8 producers\) \| [0-9]+/s \| [0-9]+/s \|`,
		`\| enqueue in batches of 100 \(8 producers\) \| [0-9]+/s \| n/a \|`,
		`\| pickup latency, idle queue \| p50 .+, p99 .+ \| p50 .+, p99 .+ \|`,
	} {
		if !regexp.MustCompile(row).MatchString(table) {
			t.Errorf("no row matching %s in:\n%s", row, table)
		}
	}
}
