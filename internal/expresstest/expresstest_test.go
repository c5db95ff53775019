package expresstest

import (
	"bytes"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"io"
	"net/http"
	"net/url"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/redisecho/redisecho/internal/redistest"
)

// do sends a JSON request and decodes a JSON answer into out (a pointer,
// or nil).
func do(t *testing.T, c *http.Client, method, u string, body any, out any) *http.Response {
	t.Helper()
	var r io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			t.Fatal(err)
		}
		r = bytes.NewReader(b)
	}
	req, err := http.NewRequest(method, u, r)
	if err != nil {
		t.Fatal(err)
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, u, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	if out != nil {
		// Decode into a zero value: Unmarshal merges into a map it is given.
		v := reflect.ValueOf(out).Elem()
		v.Set(reflect.Zero(v.Type()))
		if err := json.Unmarshal(b, out); err != nil {
			t.Fatalf("%s %s: %d %q: %v", method, u, resp.StatusCode, b, err)
		}
	}
	return resp
}

func randomHex(t *testing.T) string {
	var b [4]byte
	if _, err := rand.Read(b[:]); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(b[:])
}

// sign is cookie-signature's sign: value + "." + unpadded std base64 of
// HMAC-SHA256(secret, value).
func sign(value, secret string) string {
	m := hmac.New(sha256.New, []byte(secret))
	m.Write([]byte(value))
	return value + "." + strings.TrimRight(base64.StdEncoding.EncodeToString(m.Sum(nil)), "=")
}

// sessionCookie returns the raw Set-Cookie value named name.
func sessionCookie(t *testing.T, resp *http.Response, name string) *http.Cookie {
	t.Helper()
	for _, c := range resp.Cookies() {
		if c.Name == name {
			return c
		}
	}
	t.Fatalf("no %s cookie in %q", name, resp.Header.Values("Set-Cookie"))
	return nil
}

// get reads key from whichever of addrs holds it (a cluster's other masters
// answer MOVED).
func get(t *testing.T, addrs []string, key string) (string, bool) {
	t.Helper()
	for _, a := range addrs {
		v, err := redistest.Do(a, 2*time.Second, "GET", key)
		if err != nil {
			if strings.HasPrefix(err.Error(), "MOVED") {
				continue
			}
			t.Fatalf("GET %s on %s: %v", key, a, err)
		}
		if v == nil {
			return "", false
		}
		return v.(string), true
	}
	t.Fatalf("GET %s: no node of %v holds its slot", key, addrs)
	return "", false
}

func ttl(t *testing.T, addrs []string, key string) int64 {
	t.Helper()
	for _, a := range addrs {
		v, err := redistest.Do(a, 2*time.Second, "TTL", key)
		if err != nil && strings.HasPrefix(err.Error(), "MOVED") {
			continue
		}
		if err != nil {
			t.Fatal(err)
		}
		return v.(int64)
	}
	t.Fatalf("TTL %s: no node holds its slot", key)
	return 0
}

func TestStandalone(t *testing.T) {
	tp, err := redistest.StartStandalone()
	if err != nil {
		t.Fatalf("%v\n\n%s", err, redistest.InstallHint)
	}
	t.Cleanup(tp.Close)

	prefix := "expresstest:" + randomHex(t) + ":"
	const newKey, oldKey = "new-secret-0123456789abcdef0123456789", "old-secret-0123456789abcdef0123456789"
	app := Start(t, map[string]string{
		"REDIS_URL":      "redis://" + tp.Addrs[0],
		"SESSION_SECRET": newKey + "," + oldKey,
		"SESSION_PREFIX": prefix,
	})
	c := app.Client()

	// No session yet.
	var e map[string]any
	if resp := do(t, c, "GET", app.URL+"/profile", nil, &e); resp.StatusCode != 401 || e["error"] != "Not authenticated" {
		t.Fatalf("profile before login: %d %v", resp.StatusCode, e)
	}
	if resp := do(t, c, "POST", app.URL+"/login", map[string]any{"username": "mallory"}, &e); resp.StatusCode != 400 {
		t.Fatalf("login as an unknown user: %d %v", resp.StatusCode, e)
	}

	// Login: a signed cookie s:<sid>.<sig>, the session under prefix+sid.
	var msg map[string]string
	resp := do(t, c, "POST", app.URL+"/login", map[string]any{"username": "alice"}, &msg)
	if resp.StatusCode != 200 || msg["message"] != "Login successful" {
		t.Fatalf("login: %d %v", resp.StatusCode, msg)
	}
	ck := sessionCookie(t, resp, "sessionId")
	raw, err := url.QueryUnescape(ck.Value)
	if err != nil {
		t.Fatal(err)
	}
	sid := resp.Header.Get("X-Session-Id")
	if raw != "s:"+sign(sid, newKey) {
		t.Fatalf("cookie %q is not s:%s signed with the first secret (%q)", raw, sid, "s:"+sign(sid, newKey))
	}
	if !ck.HttpOnly || ck.Path != "/" || ck.SameSite != http.SameSiteLaxMode || ck.Secure {
		t.Fatalf("cookie attributes: %+v", ck)
	}
	if d := time.Until(ck.Expires); d < 23*time.Hour || d > 25*time.Hour {
		t.Fatalf("cookie expires in %v", d)
	}
	blob, ok := get(t, tp.Addrs, prefix+sid)
	if !ok {
		t.Fatalf("no session under %s", prefix+sid)
	}
	if !strings.HasPrefix(blob, `{"cookie":{"originalMaxAge":86400000,"expires":"`) ||
		!strings.HasSuffix(blob, `","secure":false,"httpOnly":true,"path":"/","sameSite":"lax"},"userId":1,"username":"alice","isAuthenticated":true}`) {
		t.Fatalf("stored session: %s", blob)
	}
	if ttl := ttl(t, tp.Addrs, prefix+sid); ttl < 86390 || ttl > 86400 {
		t.Fatalf("TTL %d", ttl)
	}

	var prof map[string]any
	if resp := do(t, c, "GET", app.URL+"/profile", nil, &prof); resp.StatusCode != 200 ||
		!reflect.DeepEqual(prof, map[string]any{"userId": 1.0, "username": "alice"}) {
		t.Fatalf("profile: %d %v", resp.StatusCode, prof)
	}

	// A cookie signed with the second (older) secret still verifies; a
	// tampered one does not.
	for _, tc := range []struct {
		cookie string
		want   int
	}{
		{url.QueryEscape("s:" + sign(sid, oldKey)), 200},
		{url.QueryEscape("s:"+sign(sid, newKey)) + "x", 401},
		{url.QueryEscape("s:" + sign(sid, "some-other-secret")), 401},
		{sid, 401}, // unsigned
	} {
		req, _ := http.NewRequest("GET", app.URL+"/profile", nil)
		req.Header.Set("Cookie", "sessionId="+tc.cookie)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != tc.want {
			t.Fatalf("cookie %q: %d, want %d", tc.cookie, resp.StatusCode, tc.want)
		}
	}

	// Nested values of every JSON type.
	set := map[string]any{
		"prefs":   map[string]any{"theme": "dark", "sizes": []any{1.0, 2.5, nil, true, "x"}, "deep": map[string]any{"a": map[string]any{}}},
		"note":    "é ü <>& \u2028",
		"count":   42.0,
		"flag":    false,
		"nothing": nil,
	}
	if resp := do(t, c, "POST", app.URL+"/session/set", set, nil); resp.StatusCode != 200 {
		t.Fatalf("set: %d", resp.StatusCode)
	}
	var dump map[string]any
	if resp := do(t, c, "GET", app.URL+"/session/dump", nil, &dump); resp.StatusCode != 200 {
		t.Fatalf("dump: %d", resp.StatusCode)
	}
	for k, v := range set {
		if !reflect.DeepEqual(dump[k], v) {
			t.Fatalf("dump[%q] = %#v, want %#v", k, dump[k], v)
		}
	}
	if dump["userId"] != 1.0 || dump["username"] != "alice" || dump["isAuthenticated"] != true {
		t.Fatalf("dump lost the login: %v", dump)
	}
	cookie, _ := dump["cookie"].(map[string]any)
	if cookie["originalMaxAge"] != 86400000.0 || cookie["httpOnly"] != true || cookie["path"] != "/" || cookie["sameSite"] != "lax" {
		t.Fatalf("dump cookie: %v", cookie)
	}
	blob, _ = get(t, tp.Addrs, prefix+sid)
	var stored map[string]any
	if err := json.Unmarshal([]byte(blob), &stored); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(stored["prefs"], set["prefs"]) || !strings.Contains(blob, "\"note\":\"é ü <>& \u2028\"") {
		t.Fatalf("stored after set: %s", blob)
	}
	// Reserved keys are refused.
	if resp := do(t, c, "POST", app.URL+"/session/set", map[string]any{"cookie": 1}, &e); resp.StatusCode != 400 {
		t.Fatalf("set cookie: %d %v", resp.StatusCode, e)
	}

	// Touch rewrites the session.
	if resp := do(t, c, "POST", app.URL+"/session/touch", nil, &dump); resp.StatusCode != 200 {
		t.Fatalf("touch: %d %v", resp.StatusCode, dump)
	}
	// Reload reads it back.
	if resp := do(t, c, "POST", app.URL+"/session/reload", nil, &dump); resp.StatusCode != 200 || dump["username"] != "alice" {
		t.Fatalf("reload: %d %v", resp.StatusCode, dump)
	}

	// Regenerate: a new ID and cookie, the old key gone.
	resp = do(t, c, "POST", app.URL+"/session/regenerate", map[string]any{"kept": "yes"}, &dump)
	sid2 := resp.Header.Get("X-Session-Id")
	if resp.StatusCode != 200 || sid2 == "" || sid2 == sid || dump["kept"] != "yes" || dump["userId"] != nil {
		t.Fatalf("regenerate: %d %s %v", resp.StatusCode, sid2, dump)
	}
	if _, ok := get(t, tp.Addrs, prefix+sid); ok {
		t.Fatal("the old session outlived regenerate")
	}
	if _, ok := get(t, tp.Addrs, prefix+sid2); !ok {
		t.Fatal("the regenerated session was not saved")
	}
	if resp := do(t, c, "GET", app.URL+"/profile", nil, &e); resp.StatusCode != 401 {
		t.Fatalf("profile after regenerate: %d", resp.StatusCode)
	}

	// Logout: the key goes, the cookie is cleared.
	do(t, c, "POST", app.URL+"/login", map[string]any{"username": "bob", "password": "builder"}, &msg)
	if resp := do(t, c, "GET", app.URL+"/profile", nil, &prof); resp.StatusCode != 200 || prof["userId"] != 2.0 || prof["username"] != "bob" {
		t.Fatalf("profile as bob: %d %v", resp.StatusCode, prof)
	}
	resp = do(t, c, "POST", app.URL+"/logout", nil, &msg)
	if resp.StatusCode != 200 || msg["message"] != "Logged out" {
		t.Fatalf("logout: %d %v", resp.StatusCode, msg)
	}
	if sc := strings.Join(resp.Header.Values("Set-Cookie"), "\n"); sc != "sessionId=; Path=/; Expires=Thu, 01 Jan 1970 00:00:00 GMT" {
		t.Fatalf("logout Set-Cookie: %q", sc)
	}
	if _, ok := get(t, tp.Addrs, prefix+sid2); ok {
		t.Fatal("the session outlived logout")
	}
	if resp := do(t, c, "GET", app.URL+"/profile", nil, &e); resp.StatusCode != 401 {
		t.Fatalf("profile after logout: %d", resp.StatusCode)
	}

	// A stored session without "cookie" makes express-session throw: 500,
	// and the app lives on.
	if _, err := redistest.Do(tp.Addrs[0], 2*time.Second, "SET", prefix+"nocookie", `{"isAuthenticated":true,"userId":1}`); err != nil {
		t.Fatal(err)
	}
	req, _ := http.NewRequest("GET", app.URL+"/profile", nil)
	req.Header.Set("Cookie", "sessionId="+url.QueryEscape("s:"+sign("nocookie", newKey)))
	resp, err = http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 500 {
		t.Fatalf("session without cookie: %d", resp.StatusCode)
	}
	if resp := do(t, c, "GET", app.URL+"/session/dump", nil, &dump); resp.StatusCode != 200 {
		t.Fatalf("app died: %d", resp.StatusCode)
	}

	app.Stop()
	if _, err := http.Get(app.URL + "/profile"); err == nil {
		t.Fatal("the app still answers after Stop")
	}
}

func TestCluster(t *testing.T) {
	tp, err := redistest.StartCluster()
	if err != nil {
		t.Fatalf("%v\n\n%s", err, redistest.InstallHint)
	}
	t.Cleanup(tp.Close)

	prefix := "expresstest:" + randomHex(t) + ":"
	app := Start(t, map[string]string{
		"REDIS_CLUSTER":  strings.Join(tp.Addrs, ","),
		"SESSION_SECRET": "cluster-secret",
		"SESSION_PREFIX": prefix,
		"SESSION_TTL":    "600",
		"COOKIE_MAX_AGE": "none",
	})
	// Several sessions, so that their keys land on more than one master.
	for i := range 6 {
		c := app.Client()
		var msg map[string]string
		resp := do(t, c, "POST", app.URL+"/login", map[string]any{"username": "alice"}, &msg)
		if resp.StatusCode != 200 {
			t.Fatalf("login %d: %d %v", i, resp.StatusCode, msg)
		}
		sid := resp.Header.Get("X-Session-Id")
		// A browser-session cookie: no Expires; the store uses the ttl option.
		if ck := sessionCookie(t, resp, "sessionId"); !ck.Expires.IsZero() || ck.MaxAge != 0 {
			t.Fatalf("cookie: %+v", ck)
		}
		blob, ok := get(t, tp.Addrs, prefix+sid)
		if !ok || !strings.HasPrefix(blob, `{"cookie":{"originalMaxAge":null,"expires":null,"secure":false,"httpOnly":true,"path":"/","sameSite":"lax"},"userId":1`) {
			t.Fatalf("stored: %q %v", blob, ok)
		}
		if ttl := ttl(t, tp.Addrs, prefix+sid); ttl < 590 || ttl > 600 {
			t.Fatalf("TTL %d", ttl)
		}
		var prof map[string]any
		if resp := do(t, c, "GET", app.URL+"/profile", nil, &prof); resp.StatusCode != 200 || prof["username"] != "alice" {
			t.Fatalf("profile: %d %v", resp.StatusCode, prof)
		}
		var dump map[string]any
		if resp := do(t, c, "POST", app.URL+"/session/touch", nil, &dump); resp.StatusCode != 200 || dump["userId"] != 1.0 {
			t.Fatalf("touch: %d %v", resp.StatusCode, dump)
		}
		if resp := do(t, c, "POST", app.URL+"/logout", nil, &msg); resp.StatusCode != 200 {
			t.Fatalf("logout: %d", resp.StatusCode)
		}
		if _, ok := get(t, tp.Addrs, prefix+sid); ok {
			t.Fatal("the session outlived logout")
		}
	}
}
