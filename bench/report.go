package main

import (
	"fmt"
	"io"
	"os"
	"regexp"
	"sort"
	"strings"
	"time"
)

// header is what the table's header line states.
type header struct {
	Options  options
	Go       string
	CPUs     int
	Redis    string
	Wrk      string
	Date     time.Time
	Command  string
	Warnings []string
}

// report prints the Markdown table and returns the number of broken
// entries.
func report(w io.Writer, h header, entries []*entry) int {
	o := h.Options
	mean := ""
	if o.rounds == 2 {
		mean = " (with 2 rounds: their mean)"
	}
	fmt.Fprintf(w, "Method: `wrk -t1 -c%d -d%s` over loopback HTTP, %d interleaved round(s), median req/s per case%s; "+
		"\"vs baseline\" = case median / baseline median from the same run; "+
		"Redis cmds/req = Δ of summed `INFO commandstats` calls (minus the INFO itself) / requests completed, median over rounds. "+
		"Go %s, %d CPUs; Redis %s; wrk %s; %s.\n",
		o.conns, wrkDuration(o.duration), o.rounds, mean,
		h.Go, h.CPUs, h.Redis, h.Wrk, h.Date.Format("2006-01-02 15:04 MST"))
	fmt.Fprintf(w, "Command: `%s`\n", h.Command)
	if o.duration != defaultDuration || o.rounds != defaultRounds || o.conns != defaultConns {
		fmt.Fprintf(w, "\n**Not the method**: non-default -duration/-rounds/-conns (a smoke run); do not compare these figures.\n")
	}
	for _, warn := range h.Warnings {
		fmt.Fprintf(w, "\n**Warning**: %s\n", warn)
	}
	fmt.Fprintln(w)

	medRPS := map[string]float64{}
	isBroken := map[string]bool{}
	for _, en := range entries {
		var rps []float64
		for _, r := range en.runs {
			rps = append(rps, r.RPS)
			if r.broken() {
				isBroken[en.Name] = true
			}
		}
		medRPS[en.Name] = median(rps)
	}

	fmt.Fprintln(w, "| case | req/s (median) | vs baseline | Redis cmds/req |")
	fmt.Fprintln(w, "|---|---:|---:|---:|")
	var notes []string
	for _, en := range entries {
		var cmds []float64
		for _, r := range en.runs {
			cmds = append(cmds, perRequest(r))
		}
		name, rps := en.Name, thousands(medRPS[en.Name])
		base := "baseline " + en.Baseline
		ratio := fmt.Sprintf("%.2f × %s", medRPS[en.Name]/medRPS[base], en.Baseline)
		if isBroken[en.Name] {
			notes = append(notes, brokenNote(en))
			mark := fmt.Sprintf(" ⚠ [%d]", len(notes))
			name += mark
			rps = "⚠ " + rps
			ratio = "⚠ invalid (" + ratio + ")"
		} else if isBroken[base] {
			ratio = "⚠ invalid baseline (" + ratio + ")"
		}
		fmt.Fprintf(w, "| %s | %s | %s | %.2f |\n", name, rps, ratio, median(cmds))
	}
	if len(notes) > 0 {
		fmt.Fprintln(w)
		for i, n := range notes {
			fmt.Fprintf(w, "[%d] %s\n", i+1, n)
		}
	}
	fmt.Fprintln(w)
	fmt.Fprintln(w, "Redis cmds/req counts every command Redis executed, including the ones a Lua script runs "+
		"(redis_rate's EVALSHA and its inner calls) and connection setup (HELLO, CLIENT SETINFO, redigo's PING on borrow).")
	return len(notes)
}

func brokenNote(en *entry) string {
	var parts []string
	for i, r := range en.runs {
		if !r.broken() {
			continue
		}
		p := fmt.Sprintf("round %d: %d %s of %d requests", i+1, r.bad(), r.badDescription(), r.Requests)
		if r.SocketErrors != "" {
			p += "; socket errors: " + r.SocketErrors
		}
		parts = append(parts, p)
	}
	return en.Name + " had errors, its figures are invalid — " + strings.Join(parts, "; ")
}

func median(xs []float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	s := append([]float64(nil), xs...)
	sort.Float64s(s)
	n := len(s)
	if n%2 == 1 {
		return s[n/2]
	}
	return (s[n/2-1] + s[n/2]) / 2
}

// thousands formats a rate as an integer with thousands separators.
func thousands(f float64) string {
	s := fmt.Sprintf("%.0f", f)
	var b strings.Builder
	for i, r := range s {
		if i > 0 && (len(s)-i)%3 == 0 {
			b.WriteByte(',')
		}
		b.WriteRune(r)
	}
	return b.String()
}

var shellSafe = regexp.MustCompile(`^[A-Za-z0-9_./:=@%+,-]+$`)

// commandLine reconstructs the command that produced the table.
func commandLine() string {
	parts := []string{"cd bench && go run ."}
	for _, a := range os.Args[1:] {
		if !shellSafe.MatchString(a) {
			a = "'" + strings.ReplaceAll(a, "'", `'\''`) + "'"
		}
		parts = append(parts, a)
	}
	return strings.Join(parts, " ")
}
