package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"runtime"
	"time"

	"github.com/labstack/echo/v4"
)

// entry is a selected case with its per-run state and results.
type entry struct {
	Case
	env    *Env
	header http.Header
	script string   // wrk -s script, for non-GET methods and Status cases
	redis  []string // servers whose commands are counted
	runs   []runResult
}

type runResult struct {
	wrkResult
	Commands int64 // Redis commands during the run, all servers
}

// run executes the method and prints the table. It returns how many
// entries had errors.
func run(ctx context.Context, o options) (broken int, err error) {
	wrkBin, err := wrkPath()
	if err != nil {
		return 0, err
	}
	entries, err := selectCases(o)
	if err != nil {
		return 0, err
	}

	// Redis.
	redisAddr, redisKind, stopRedis, err := useRedis(ctx, o.redis)
	if err != nil {
		return 0, err
	}
	defer stopRedis()
	probe, err := dialRedis(redisAddr)
	if err != nil {
		return 0, fmt.Errorf("redis %s: %w", redisAddr, err)
	}
	redisVersion, err := probe.serverVersion()
	probe.Close()
	if err != nil {
		return 0, fmt.Errorf("redis %s: %w", redisAddr, err)
	}

	// The app.
	var closers []func() error
	defer func() {
		for i := len(closers) - 1; i >= 0; i-- {
			_ = closers[i]()
		}
	}()
	e := echo.New()
	e.HideBanner, e.HidePort = true, true
	for path, h := range baselineHandlers {
		e.GET(path, h)
	}
	httpClient := &http.Client{Timeout: 10 * time.Second}
	defer httpClient.CloseIdleConnections()
	for _, en := range entries {
		en.env = &Env{Redis: redisAddr, KeyPrefix: keyPrefix(en.Name), HTTP: httpClient, closers: &closers}
		if err := en.Register(e, en.env); err != nil {
			return 0, fmt.Errorf("%s: register: %w", en.Name, err)
		}
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	server := &http.Server{Handler: e, ReadHeaderTimeout: 10 * time.Second}
	go func() { _ = server.Serve(ln) }()
	defer server.Close()
	baseURL := "http://" + ln.Addr().String()
	logf("serving on %s", baseURL)

	// Setup and a check that every route answers its baseline's body.
	if err := prepare(ctx, entries, baseURL, &closers); err != nil {
		return 0, err
	}

	// One bare INFO connection per Redis, opened before any run.
	snap := map[string]*redisConn{}
	defer func() {
		for _, c := range snap {
			c.Close()
		}
	}()
	var warnings []string
	for _, en := range entries {
		for _, addr := range en.redis {
			if snap[addr] != nil {
				continue
			}
			c, err := dialRedis(addr)
			if err != nil {
				return 0, fmt.Errorf("redis %s: %w", addr, err)
			}
			snap[addr] = c
			if w := calibrate(c, addr); w != "" {
				warnings = append(warnings, w)
			}
		}
	}

	// The rounds.
	for round := 1; round <= o.rounds; round++ {
		for _, en := range entries {
			before := map[string]int64{}
			for _, addr := range en.redis {
				if before[addr], err = snap[addr].totalCalls(); err != nil {
					return 0, fmt.Errorf("redis %s: %w", addr, err)
				}
			}
			res, err := runWrk(ctx, wrkBin, wrkArgs(o, baseURL+en.Path, en.header, en.script), en.Status)
			if err != nil {
				return 0, fmt.Errorf("%s: %w", en.Name, err)
			}
			r := runResult{wrkResult: res}
			for _, addr := range en.redis {
				after, err := snap[addr].totalCalls()
				if err != nil {
					return 0, fmt.Errorf("redis %s: %w", addr, err)
				}
				r.Commands += after - before[addr] - 1 // minus the first INFO
			}
			en.runs = append(en.runs, r)
			flag := ""
			if res.broken() {
				flag = fmt.Sprintf("  ERRORS: %s %d, socket errors %q", res.badDescription(), res.bad(), res.SocketErrors)
			}
			logf("round %d/%d %-40s %9.0f req/s  %5.2f Redis cmds/req%s",
				round, o.rounds, en.Name, res.RPS, perRequest(r), flag)
		}
	}

	h := header{
		Options:  o,
		Go:       runtime.Version() + " " + runtime.GOOS + "/" + runtime.GOARCH,
		CPUs:     runtime.NumCPU(),
		Redis:    redisVersion + " (" + redisKind + ")",
		Wrk:      wrkVersion(wrkBin),
		Date:     time.Now().UTC(),
		Command:  commandLine(),
		Warnings: warnings,
	}
	return report(os.Stdout, h, entries), nil
}

// selectCases applies -cases, adds the baselines the selected cases need,
// and validates the registry.
func selectCases(o options) ([]*entry, error) {
	all := append(append([]Case{}, baselines...), cases...)
	names, paths, prefixes := map[string]bool{}, map[string]bool{}, map[string]bool{}
	for path := range baselineHandlers {
		paths[path] = true
	}
	for _, c := range all {
		p := keyPrefix(c.Name)
		switch {
		case c.Name == "" || c.Path == "" || c.Register == nil:
			return nil, fmt.Errorf("case %q: Name, Path and Register are required", c.Name)
		case names[c.Name]:
			return nil, fmt.Errorf("case %q: duplicate name", c.Name)
		case prefixes[p]:
			return nil, fmt.Errorf("case %q: key prefix %q is not unique", c.Name, p)
		case baselineHandlers[c.Baseline] == nil:
			return nil, fmt.Errorf("case %q: unknown baseline %q", c.Name, c.Baseline)
		case c.Baseline != c.Path && paths[c.Path]:
			return nil, fmt.Errorf("case %q: duplicate path %q", c.Name, c.Path)
		case c.Status != 0 && (c.Status < 100 || c.Status > 599):
			return nil, fmt.Errorf("case %q: invalid Status %d", c.Name, c.Status)
		}
		names[c.Name], paths[c.Path], prefixes[p] = true, true, true
	}

	want := map[string]bool{}
	for _, c := range cases {
		if o.cases.MatchString(c.Name) {
			want[c.Name], want["baseline "+c.Baseline] = true, true
		}
	}
	for _, c := range baselines {
		if o.cases.MatchString(c.Name) {
			want[c.Name] = true
		}
	}
	var out []*entry
	for _, c := range all {
		if want[c.Name] {
			out = append(out, &entry{Case: c})
		}
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("-cases %q selects no case", o.cases)
	}
	return out, nil
}

// prepare runs each Setup, then checks that each route answers 2xx with
// its baseline's body, or its Status when set. Cleanups go to closers.
func prepare(ctx context.Context, entries []*entry, baseURL string, closers *[]func() error) error {
	bodies := map[string][]byte{}
	type scriptKey struct {
		method string
		status int
	}
	scripts := map[scriptKey]string{}
	for _, en := range entries {
		en.env.BaseURL = baseURL
		if en.Setup != nil {
			h, err := en.Setup(ctx, en.env)
			if err != nil {
				return fmt.Errorf("%s: setup: %w", en.Name, err)
			}
			en.header = h
		}
		if en.Method == "" {
			en.Method = http.MethodGet
		}
		if en.Method != http.MethodGet || en.Status != 0 {
			k := scriptKey{en.Method, en.Status}
			if scripts[k] == "" {
				s, err := wrkScript(en.Method, en.Status)
				if err != nil {
					return err
				}
				scripts[k] = s
				*closers = append(*closers, func() error { return os.Remove(s) })
			}
			en.script = scripts[k]
		}
		en.redis = []string{en.env.Redis}
		if en.Redis != nil {
			en.redis = en.Redis(en.env)
		}

		if bodies[en.Baseline] == nil {
			_, b, err := en.env.Do(ctx, http.MethodGet, en.Baseline, nil)
			if err != nil {
				return fmt.Errorf("baseline: %w", err)
			}
			bodies[en.Baseline] = b
		}
		if en.Status != 0 {
			resp, b, err := en.env.Send(ctx, en.Method, en.Path, en.header)
			if err != nil {
				return fmt.Errorf("%s: check request: %w", en.Name, err)
			}
			if resp.StatusCode != en.Status {
				return fmt.Errorf("%s: check request: %s %s: %s, want %d: %s",
					en.Name, en.Method, en.Path, resp.Status, en.Status, bytes.TrimSpace(b))
			}
			continue
		}
		_, b, err := en.env.Do(ctx, en.Method, en.Path, en.header)
		if err != nil {
			return fmt.Errorf("%s: check request: %w", en.Name, err)
		}
		if !bytes.Equal(b, bodies[en.Baseline]) {
			return fmt.Errorf("%s: body differs from baseline %s:\n%s", en.Name, en.Baseline, b)
		}
	}
	return nil
}

// calibrate checks that two back-to-back snapshots differ by exactly the
// one INFO call, i.e. that nothing else talks to this Redis.
func calibrate(c *redisConn, addr string) string {
	a, err1 := c.totalCalls()
	b, err2 := c.totalCalls()
	if err := errors.Join(err1, err2); err != nil {
		return fmt.Sprintf("Redis %s: calibration failed: %v", addr, err)
	}
	if b-a != 1 {
		return fmt.Sprintf("Redis %s: back-to-back INFO snapshots differ by %d, not 1: other clients are sending commands, Redis cmds/req is inflated", addr, b-a)
	}
	return ""
}

func perRequest(r runResult) float64 {
	if r.Requests == 0 {
		return 0
	}
	return float64(r.Commands) / float64(r.Requests)
}
