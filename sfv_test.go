package redisecho

// A small parser for HTTP Structured Field Values (RFC 9651, which obsoletes
// RFC 8941), limited to List fields such as RateLimit and RateLimit-Policy.
// It follows the parsing algorithms of RFC 9651 Section 4.2 step by step;
// the section numbers in the comments refer to that RFC.
//
// Bare item types map to Go values as follows:
//
//	Integer        int64
//	Decimal        float64
//	String         string
//	Token          sfToken
//	Byte Sequence  []byte (never nil)
//	Boolean        bool
//	Date           sfDate (seconds since the Unix epoch)
//	Display String sfDisplayString
//
// An Inner List is an sfItem whose Value is an sfInnerList; the inner list's
// own parameters are that sfItem's Params.

import (
	"encoding/base64"
	"fmt"
	"strconv"
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/stretchr/testify/require"
)

// sfToken is a Token bare item (RFC 9651 Section 3.3.4).
type sfToken string

// sfDate is a Date bare item (RFC 9651 Section 3.3.7): seconds since the epoch.
type sfDate int64

// sfDisplayString is a Display String bare item (RFC 9651 Section 3.3.8).
type sfDisplayString string

// sfInnerList is an Inner List (RFC 9651 Section 3.1.1).
type sfInnerList []sfItem

// sfParam is one parameter of an Item or Inner List.
type sfParam struct {
	Key   string
	Value any
}

// sfItem is a List member: an Item or an Inner List, with its parameters in
// order. Params is nil when there are none.
type sfItem struct {
	Value  any
	Params []sfParam
}

// Param returns the value of the parameter named key and whether it is present.
// A parameter without "=value" has the value true.
func (it sfItem) Param(key string) (any, bool) {
	for _, p := range it.Params {
		if p.Key == key {
			return p.Value, true
		}
	}
	return nil, false
}

// parseSFList parses a field value as a Structured Field List
// (RFC 9651 Section 4.2 with field_type "list"). Multiple field lines must
// already be joined with ", ". An empty (or all-SP) value is an empty List,
// which callers should treat like an absent field.
func parseSFList(s string) ([]sfItem, error) {
	// Step 1: the input must be ASCII.
	for i := 0; i < len(s); i++ {
		if s[i] > 0x7f {
			return nil, fmt.Errorf("sf: non-ASCII byte 0x%02x at offset %d", s[i], i)
		}
	}
	p := &sfParser{s: s}
	p.discardSP() // step 2
	list, err := p.parseList()
	if err != nil {
		return nil, err
	}
	p.discardSP()   // step 6
	if !p.empty() { // step 7
		return nil, p.errorf("unexpected trailing characters")
	}
	return list, nil
}

type sfParser struct {
	s   string
	pos int
}

func (p *sfParser) empty() bool { return p.pos >= len(p.s) }

// peek returns the first remaining character, or 0 when the input is empty.
// NUL is never a character the grammar accepts, so callers that compare the
// result with an accepted character need no separate emptiness check.
func (p *sfParser) peek() byte {
	if p.empty() {
		return 0
	}
	return p.s[p.pos]
}

func (p *sfParser) errorf(format string, args ...any) error {
	return fmt.Errorf("sf: offset %d: %s", p.pos, fmt.Sprintf(format, args...))
}

func (p *sfParser) discardSP() {
	for !p.empty() && p.s[p.pos] == ' ' {
		p.pos++
	}
}

// discardOWS drops SP and HTAB.
func (p *sfParser) discardOWS() {
	for !p.empty() && (p.s[p.pos] == ' ' || p.s[p.pos] == '\t') {
		p.pos++
	}
}

// parseList implements Section 4.2.1.
func (p *sfParser) parseList() ([]sfItem, error) {
	var members []sfItem
	for !p.empty() {
		m, err := p.parseItemOrInnerList()
		if err != nil {
			return nil, err
		}
		members = append(members, m)
		p.discardOWS()
		if p.empty() {
			return members, nil
		}
		if c := p.s[p.pos]; c != ',' {
			return nil, p.errorf("expected ',' after list member, got %q", c)
		}
		p.pos++
		p.discardOWS()
		if p.empty() {
			return nil, p.errorf("trailing comma in list")
		}
	}
	return members, nil
}

// parseItemOrInnerList implements Section 4.2.1.1.
func (p *sfParser) parseItemOrInnerList() (sfItem, error) {
	if p.peek() == '(' {
		return p.parseInnerList()
	}
	return p.parseItem()
}

// parseInnerList implements Section 4.2.1.2.
func (p *sfParser) parseInnerList() (sfItem, error) {
	if p.peek() != '(' {
		return sfItem{}, p.errorf("expected '('")
	}
	p.pos++
	inner := sfInnerList{}
	for !p.empty() {
		p.discardSP()
		if p.peek() == ')' {
			p.pos++
			params, err := p.parseParameters()
			if err != nil {
				return sfItem{}, err
			}
			return sfItem{Value: inner, Params: params}, nil
		}
		it, err := p.parseItem()
		if err != nil {
			return sfItem{}, err
		}
		inner = append(inner, it)
		if c := p.peek(); c != ' ' && c != ')' {
			return sfItem{}, p.errorf("expected SP or ')' in inner list")
		}
	}
	return sfItem{}, p.errorf("unterminated inner list")
}

// parseItem implements Section 4.2.3.
func (p *sfParser) parseItem() (sfItem, error) {
	v, err := p.parseBareItem()
	if err != nil {
		return sfItem{}, err
	}
	params, err := p.parseParameters()
	if err != nil {
		return sfItem{}, err
	}
	return sfItem{Value: v, Params: params}, nil
}

func sfIsDigit(c byte) bool   { return c >= '0' && c <= '9' }
func sfIsAlpha(c byte) bool   { return c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' }
func sfIsLCAlpha(c byte) bool { return c >= 'a' && c <= 'z' }

// parseBareItem implements Section 4.2.3.1.
func (p *sfParser) parseBareItem() (any, error) {
	if p.empty() {
		return nil, p.errorf("expected a bare item, got end of input")
	}
	switch c := p.s[p.pos]; {
	case c == '-' || sfIsDigit(c):
		return p.parseNumber()
	case c == '"':
		return p.parseString()
	case c == '*' || sfIsAlpha(c):
		return p.parseToken()
	case c == ':':
		return p.parseByteSequence()
	case c == '?':
		return p.parseBoolean()
	case c == '@':
		return p.parseDate()
	case c == '%':
		return p.parseDisplayString()
	default:
		return nil, p.errorf("unexpected character %q at start of bare item", c)
	}
}

// parseParameters implements Section 4.2.3.2. A repeated key keeps its first
// position and takes the last value.
func (p *sfParser) parseParameters() ([]sfParam, error) {
	var params []sfParam
	for p.peek() == ';' {
		p.pos++
		p.discardSP()
		key, err := p.parseKey()
		if err != nil {
			return nil, err
		}
		var value any = true
		if p.peek() == '=' {
			p.pos++
			if value, err = p.parseBareItem(); err != nil {
				return nil, err
			}
		}
		replaced := false
		for i := range params {
			if params[i].Key == key {
				params[i].Value = value
				replaced = true
				break
			}
		}
		if !replaced {
			params = append(params, sfParam{Key: key, Value: value})
		}
	}
	return params, nil
}

// parseKey implements Section 4.2.3.3.
func (p *sfParser) parseKey() (string, error) {
	if c := p.peek(); c != '*' && !sfIsLCAlpha(c) {
		return "", p.errorf("key must start with a lowercase letter or '*'")
	}
	start := p.pos
	for !p.empty() {
		c := p.s[p.pos]
		if !sfIsLCAlpha(c) && !sfIsDigit(c) && c != '_' && c != '-' && c != '.' && c != '*' {
			break
		}
		p.pos++
	}
	return p.s[start:p.pos], nil
}

// parseNumber implements Section 4.2.4; it returns int64 or float64.
func (p *sfParser) parseNumber() (any, error) {
	isDecimal := false
	neg := false
	if p.peek() == '-' {
		p.pos++
		neg = true
	}
	if p.empty() {
		return nil, p.errorf("expected a digit, got end of input")
	}
	if !sfIsDigit(p.s[p.pos]) {
		return nil, p.errorf("expected a digit, got %q", p.s[p.pos])
	}
	start := p.pos
	for !p.empty() {
		c := p.s[p.pos]
		switch {
		case sfIsDigit(c):
			p.pos++
		case !isDecimal && c == '.':
			if p.pos-start > 12 {
				return nil, p.errorf("decimal has more than 12 integer digits")
			}
			p.pos++
			isDecimal = true
		default:
			goto done
		}
		if !isDecimal && p.pos-start > 15 {
			return nil, p.errorf("integer has more than 15 digits")
		}
		if isDecimal && p.pos-start > 16 {
			return nil, p.errorf("decimal has more than 16 characters")
		}
	}
done:
	num := p.s[start:p.pos]
	if !isDecimal {
		n, err := strconv.ParseInt(num, 10, 64)
		if err != nil {
			return nil, p.errorf("bad integer %q: %v", num, err)
		}
		if neg {
			n = -n
		}
		return n, nil
	}
	if strings.HasSuffix(num, ".") {
		return nil, p.errorf("decimal ends with '.'")
	}
	if frac := len(num) - strings.IndexByte(num, '.') - 1; frac > 3 {
		return nil, p.errorf("decimal has more than 3 fractional digits")
	}
	f, err := strconv.ParseFloat(num, 64)
	if err != nil {
		return nil, p.errorf("bad decimal %q: %v", num, err)
	}
	if neg {
		f = -f
	}
	return f, nil
}

// parseString implements Section 4.2.5.
func (p *sfParser) parseString() (string, error) {
	if p.peek() != '"' {
		return "", p.errorf("expected '\"'")
	}
	p.pos++
	var b strings.Builder
	for !p.empty() {
		c := p.s[p.pos]
		p.pos++
		switch {
		case c == '\\':
			if p.empty() {
				return "", p.errorf("string ends after '\\'")
			}
			next := p.s[p.pos]
			p.pos++
			if next != '"' && next != '\\' {
				return "", p.errorf("invalid escape '\\%c' in string", next)
			}
			b.WriteByte(next)
		case c == '"':
			return b.String(), nil
		case c <= 0x1f || c >= 0x7f:
			return "", p.errorf("invalid character 0x%02x in string", c)
		default:
			b.WriteByte(c)
		}
	}
	return "", p.errorf("unterminated string")
}

// sfIsTChar reports whether c is a tchar (RFC 9110 Section 5.6.2).
func sfIsTChar(c byte) bool {
	if sfIsAlpha(c) || sfIsDigit(c) {
		return true
	}
	return strings.IndexByte("!#$%&'*+-.^_`|~", c) >= 0
}

// parseToken implements Section 4.2.6.
func (p *sfParser) parseToken() (sfToken, error) {
	if c := p.peek(); c != '*' && !sfIsAlpha(c) {
		return "", p.errorf("token must start with a letter or '*'")
	}
	start := p.pos
	for !p.empty() {
		c := p.s[p.pos]
		if !sfIsTChar(c) && c != ':' && c != '/' {
			break
		}
		p.pos++
	}
	return sfToken(p.s[start:p.pos]), nil
}

// parseByteSequence implements Section 4.2.7. As the RFC recommends, missing
// "=" padding and non-zero pad bits are accepted.
func (p *sfParser) parseByteSequence() ([]byte, error) {
	if p.peek() != ':' {
		return nil, p.errorf("expected ':'")
	}
	p.pos++
	end := strings.IndexByte(p.s[p.pos:], ':')
	if end < 0 {
		return nil, p.errorf("unterminated byte sequence")
	}
	b64 := p.s[p.pos : p.pos+end]
	p.pos += end + 1
	for i := 0; i < len(b64); i++ {
		c := b64[i]
		if !sfIsAlpha(c) && !sfIsDigit(c) && c != '+' && c != '/' && c != '=' {
			return nil, p.errorf("invalid character %q in byte sequence", c)
		}
	}
	data := strings.TrimRight(b64, "=")
	if pad := len(b64) - len(data); pad > 0 && (pad > 2 || len(b64)%4 != 0) {
		return nil, p.errorf("bad base64 padding in byte sequence")
	}
	if strings.IndexByte(data, '=') >= 0 {
		return nil, p.errorf("'=' inside byte sequence")
	}
	out, err := base64.RawStdEncoding.DecodeString(data)
	if err != nil {
		return nil, p.errorf("bad base64 in byte sequence: %v", err)
	}
	if out == nil {
		out = []byte{}
	}
	return out, nil
}

// parseBoolean implements Section 4.2.8.
func (p *sfParser) parseBoolean() (bool, error) {
	if p.peek() != '?' {
		return false, p.errorf("expected '?'")
	}
	p.pos++
	switch p.peek() {
	case '1':
		p.pos++
		return true, nil
	case '0':
		p.pos++
		return false, nil
	}
	return false, p.errorf("boolean must be ?0 or ?1")
}

// parseDate implements Section 4.2.9.
func (p *sfParser) parseDate() (sfDate, error) {
	if p.peek() != '@' {
		return 0, p.errorf("expected '@'")
	}
	p.pos++
	v, err := p.parseNumber()
	if err != nil {
		return 0, err
	}
	n, ok := v.(int64)
	if !ok {
		return 0, p.errorf("date must be an integer")
	}
	return sfDate(n), nil
}

func sfIsLCHex(c byte) bool { return sfIsDigit(c) || c >= 'a' && c <= 'f' }

// parseDisplayString implements Section 4.2.10.
func (p *sfParser) parseDisplayString() (sfDisplayString, error) {
	if !strings.HasPrefix(p.s[p.pos:], `%"`) {
		return "", p.errorf("expected '%%\"'")
	}
	p.pos += 2
	var buf []byte
	for !p.empty() {
		c := p.s[p.pos]
		p.pos++
		switch {
		case c <= 0x1f || c >= 0x7f:
			return "", p.errorf("invalid character 0x%02x in display string", c)
		case c == '%':
			if len(p.s)-p.pos < 2 {
				return "", p.errorf("truncated percent-encoding in display string")
			}
			hi, lo := p.s[p.pos], p.s[p.pos+1]
			if !sfIsLCHex(hi) || !sfIsLCHex(lo) {
				return "", p.errorf("percent-encoding must be two lowercase hex digits")
			}
			p.pos += 2
			n, _ := strconv.ParseUint(string([]byte{hi, lo}), 16, 8)
			buf = append(buf, byte(n))
		case c == '"':
			if !utf8.Valid(buf) {
				return "", p.errorf("display string is not valid UTF-8")
			}
			return sfDisplayString(buf), nil
		default:
			buf = append(buf, c)
		}
	}
	return "", p.errorf("unterminated display string")
}

func TestSFParser(t *testing.T) {
	tok := func(s string) sfItem { return sfItem{Value: sfToken(s)} }
	val := func(v any, params ...sfParam) sfItem { return sfItem{Value: v, Params: params} }
	par := func(k string, v any) sfParam { return sfParam{Key: k, Value: v} }

	valid := []struct {
		name string
		in   string
		want []sfItem
	}{
		// Lists and whitespace (Sections 3.1, 4.2, 4.2.1).
		{"empty field", "", nil},
		{"only spaces", "   ", nil},
		{"token list", "sugar, tea, rum", []sfItem{tok("sugar"), tok("tea"), tok("rum")}},
		{"no space after comma", "1,42", []sfItem{val(int64(1)), val(int64(42))}},
		{"OWS around comma", "1 \t , \t 42", []sfItem{val(int64(1)), val(int64(42))}},
		{"leading and trailing SP", "   1, 42   ", []sfItem{val(int64(1)), val(int64(42))}},
		// The list algorithm discards OWS (SP and HTAB) after each member.
		{"trailing HTAB after member", "1\t", []sfItem{val(int64(1))}},

		// Integers and Decimals (Sections 3.3.1, 3.3.2, 4.2.4).
		{"zero", "0", []sfItem{val(int64(0))}},
		{"negative zero", "-0", []sfItem{val(int64(0))}},
		{"leading zeros", "042", []sfItem{val(int64(42))}},
		{"negative integer", "-42", []sfItem{val(int64(-42))}},
		{"15-digit integer", "999999999999999", []sfItem{val(int64(999999999999999))}},
		{"15-digit negative integer", "-999999999999999", []sfItem{val(int64(-999999999999999))}},
		{"decimal", "4.5", []sfItem{val(4.5)}},
		{"negative decimal", "-1.5", []sfItem{val(-1.5)}},
		{"three fractional digits", "1.123", []sfItem{val(1.123)}},
		{"12 integer digits", "123456789012.1", []sfItem{val(123456789012.1)}},
		{"16-character decimal", "123456789012.123", []sfItem{val(123456789012.123)}},

		// Strings (Sections 3.3.3, 4.2.5).
		{"string", `"hello world"`, []sfItem{val("hello world")}},
		{"empty string", `""`, []sfItem{val("")}},
		{"escaped quote and backslash", `"a\"b\\c"`, []sfItem{val(`a"b\c`)}},
		{"string with comma", `"a, b", "c"`, []sfItem{val("a, b"), val("c")}},

		// Tokens (Sections 3.3.4, 4.2.6).
		{"token with all allowed chars", "a_b-c.d3:f%00/*", []sfItem{tok("a_b-c.d3:f%00/*")}},
		{"token starting with *", "*foo", []sfItem{tok("*foo")}},
		{"uppercase token", "FooBar", []sfItem{tok("FooBar")}},
		{"mime-type token", "text/html;q=1.0", []sfItem{val(sfToken("text/html"), par("q", 1.0))}},

		// Byte Sequences (Sections 3.3.5, 4.2.7).
		{"byte sequence", ":cHJldGVuZCB0aGlzIGlzIGJpbmFyeSBjb250ZW50Lg==:",
			[]sfItem{val([]byte("pretend this is binary content."))}},
		{"empty byte sequence", "::", []sfItem{val([]byte{})}},
		{"byte sequence without padding", ":aGVsbG8:", []sfItem{val([]byte("hello"))}},
		{"byte sequence non-zero pad bits", ":iZ==:", []sfItem{val([]byte{0x89})}},

		// Booleans (Sections 3.3.6, 4.2.8).
		{"true", "?1", []sfItem{val(true)}},
		{"false", "?0", []sfItem{val(false)}},

		// Dates and Display Strings (RFC 9651 Sections 3.3.7, 3.3.8, 4.2.9, 4.2.10).
		{"date", "@1659578233", []sfItem{val(sfDate(1659578233))}},
		{"negative date", "@-1", []sfItem{val(sfDate(-1))}},
		{"display string", `%"This is intended for display to %c3%bcsers."`,
			[]sfItem{val(sfDisplayString("This is intended for display to üsers."))}},
		{"display string with escaped %", `%"100%25"`, []sfItem{val(sfDisplayString("100%"))}},

		// Parameters (Sections 3.1.2, 4.2.3.2, 4.2.3.3).
		{"parameters", "abc;a=1;b=2; cde_456, (ghi;jk=4 l);q=\"9\";r=w", []sfItem{
			val(sfToken("abc"), par("a", int64(1)), par("b", int64(2)), par("cde_456", true)),
			val(sfInnerList{val(sfToken("ghi"), par("jk", int64(4))), tok("l")},
				par("q", "9"), par("r", sfToken("w"))),
		}},
		{"bare key is true", "1;a;b=?0", []sfItem{val(int64(1), par("a", true), par("b", false))}},
		{"key chars", "1;a1_-.*=1;*=2", []sfItem{val(int64(1), par("a1_-.*", int64(1)), par("*", int64(2)))}},
		{"SP after semicolon", "1; a=1", []sfItem{val(int64(1), par("a", int64(1)))}},
		{"duplicate key keeps position, last value wins", "1;a=1;b=2;a=3",
			[]sfItem{val(int64(1), par("a", int64(3)), par("b", int64(2)))}},
		{"all parameter value types", `x;i=-7;d=0.5;s="s";t=tk;b=:AQID:;f=?0;dt=@0;ds=%"x"`, []sfItem{
			val(sfToken("x"), par("i", int64(-7)), par("d", 0.5), par("s", "s"), par("t", sfToken("tk")),
				par("b", []byte{1, 2, 3}), par("f", false), par("dt", sfDate(0)), par("ds", sfDisplayString("x"))),
		}},

		// Inner Lists (Sections 3.1.1, 4.2.1.2).
		{"inner lists", `("foo" "bar"), ("baz"), ("bat" "one"), ()`, []sfItem{
			val(sfInnerList{val("foo"), val("bar")}),
			val(sfInnerList{val("baz")}),
			val(sfInnerList{val("bat"), val("one")}),
			val(sfInnerList{}),
		}},
		{"inner list extra spaces", "(  1   2  )", []sfItem{val(sfInnerList{val(int64(1)), val(int64(2))})}},

		// The RateLimit draft's examples.
		{"RateLimit-Policy", `"burst";q=100;w=60,"daily";q=1000;w=86400`, []sfItem{
			val("burst", par("q", int64(100)), par("w", int64(60))),
			val("daily", par("q", int64(1000)), par("w", int64(86400))),
		}},
		{"RateLimit-Policy with qu and pk", `"peruser";q=65535;qu="content-bytes";w=10;pk=:QXBwLTk5OQ==:`, []sfItem{
			val("peruser", par("q", int64(65535)), par("qu", "content-bytes"), par("w", int64(10)),
				par("pk", []byte("App-999"))),
		}},
		{"RateLimit", `"default";r=50;t=30`, []sfItem{val("default", par("r", int64(50)), par("t", int64(30)))}},
	}
	for _, tc := range valid {
		t.Run("valid/"+tc.name, func(t *testing.T) {
			got, err := parseSFList(tc.in)
			require.NoError(t, err, "input %q", tc.in)
			if len(tc.want) == 0 {
				require.Empty(t, got)
				return
			}
			require.Equal(t, tc.want, got, "input %q", tc.in)
		})
	}

	invalid := []struct {
		name string
		in   string
	}{
		// Lists and whitespace.
		{"leading comma", ",1"},
		{"trailing comma", "1,"},
		{"trailing comma and SP", "1, "},
		{"empty member", "1,,2"},
		{"missing comma", "1 2"},
		{"leading HTAB", "\t1"},
		{"non-ASCII", "caf\u00e9"},
		{"illegal first character", "<foo>"},

		// Integers and Decimals.
		{"16-digit integer", "1234567890123456"},
		{"16-digit negative integer", "-1234567890123456"},
		{"bare minus", "-"},
		{"double minus", "--1"},
		{"minus then letter", "-a"},
		{"space after minus", "- 1"},
		{"sign inside number", "4-2"},
		{"trailing dot", "1."},
		{"leading dot", ".5"},
		{"double dot", "1..2"},
		{"two decimal points", "1.2.3"},
		{"four fractional digits", "1.1234"},
		{"13 integer digits in decimal", "1234567890123.1"},
		{"17-character decimal", "123456789012.1234"},
		{"exponent", "1e3"},

		// Strings.
		{"unterminated string", `"abc`},
		{"escaped closing quote", `"abc\"`},
		{"bad escape", `"a\nb"`},
		{"backslash at end", `"abc\`},
		{"HTAB in string", "\"a\tb\""},
		{"DEL in string", "\"a\x7fb\""},

		// Tokens.
		{"token starting with #", "#foo"},
		{"token with bad char", "foo@bar"},
		{"token with space", "foo bar"},

		// Byte Sequences.
		{"unterminated byte sequence", ":aGVsbG8="},
		{"space in byte sequence", ":aGVs bG8=:"},
		{"bad base64 char", ":aGVsbG8!:"},
		{"url-safe base64", ":_-8=:"},
		{"padding in the middle", ":aG=VsbG8:"},
		{"too much padding", ":aGVsbG8===:"},
		{"impossible base64 length", ":abcde:"},

		// Booleans.
		{"bad boolean", "?2"},
		{"bare question mark", "?"},
		{"boolean word", "?true"},

		// Dates and Display Strings.
		{"decimal date", "@1659578233.12"},
		{"bare at", "@"},
		{"display string uppercase hex", `%"%C3%BC"`},
		{"display string truncated escape", `%"%c"`},
		{"display string invalid UTF-8", `%"%ff"`},
		{"display string unterminated", `%"abc`},
		{"percent without quote", "%abc"},

		// Parameters.
		{"uppercase key", "1;A=1"},
		{"key starting with digit", "1;1a=1"},
		{"empty key", "1;=1"},
		{"dangling semicolon", "1;"},
		{"SP before semicolon", "1 ;a=1"},
		{"SP before equals", "1;a =1"},
		{"SP after equals", "1;a= 1"},
		{"missing parameter value", "1;a="},
		{"inner list as parameter value", "1;a=(1)"},

		// Inner Lists.
		{"unterminated inner list", "(1 2"},
		{"comma in inner list", "(1,2)"},
		{"HTAB in inner list", "(1\t2)"},
		{"adjacent inner lists", "(1)(2)"},
		{"nested inner list", "((1))"},
		{"no space between inner items", `("a""b")`},
	}
	for _, tc := range invalid {
		t.Run("invalid/"+tc.name, func(t *testing.T) {
			got, err := parseSFList(tc.in)
			require.Error(t, err, "input %q parsed as %#v", tc.in, got)
			require.Nil(t, got)
		})
	}

	t.Run("Param", func(t *testing.T) {
		list, err := parseSFList(`"day";q=5000;w=86400;flag`)
		require.NoError(t, err)
		require.Len(t, list, 1)
		q, ok := list[0].Param("q")
		require.True(t, ok)
		require.Equal(t, int64(5000), q)
		flag, ok := list[0].Param("flag")
		require.True(t, ok)
		require.Equal(t, true, flag)
		_, ok = list[0].Param("pk")
		require.False(t, ok)
		_, ok = sfItem{}.Param("q")
		require.False(t, ok)
	})

}
