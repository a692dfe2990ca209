// Package iptsave reads the text iptables-save and `iptables -S` print:
// rule lines by table, and rule tokens the way iptables quotes them. Both
// berth's own NAT backend and the detection of dockerd's rules use it, so
// there is one reader of that format.
package iptsave

import "strings"

// Lines calls fn for every line of text (without the line break and a
// trailing \r) with the table it belongs to: the name of the last
// "*table" header, or "" before any header (`iptables -S` output) and
// after a COMMIT.
func Lines(text string, fn func(table, line string)) {
	table := ""
	for len(text) > 0 {
		var line string
		if i := strings.IndexByte(text, '\n'); i >= 0 {
			line, text = text[:i], text[i+1:]
		} else {
			line, text = text, ""
		}
		line = strings.TrimRight(line, "\r")
		switch {
		case strings.HasPrefix(line, "*"):
			table = line[1:]
		case line == "COMMIT":
			table = ""
		default:
			fn(table, line)
		}
	}
}

// Tokenize splits a rule the way iptables-save quotes it: tokens separated
// by spaces, double quotes around a token with spaces, backslash escapes
// inside quotes. ok is false for an unclosed quote.
func Tokenize(s string) (toks []string, ok bool) {
	toks = make([]string, 0, 20)
	for i := 0; i < len(s); {
		if s[i] == ' ' || s[i] == '\t' {
			i++
			continue
		}
		if s[i] != '"' {
			j := i
			for j < len(s) && s[j] != ' ' && s[j] != '\t' {
				j++
			}
			toks = append(toks, s[i:j])
			i = j
			continue
		}
		// quoted: without escapes the token is a substring
		j := i + 1
		for j < len(s) && s[j] != '"' && s[j] != '\\' {
			j++
		}
		if j < len(s) && s[j] == '"' {
			toks = append(toks, s[i+1:j])
			i = j + 1
			continue
		}
		var b strings.Builder
		b.WriteString(s[i+1 : j])
		i = j
		closed := false
		for i < len(s) {
			c := s[i]
			if c == '\\' && i+1 < len(s) {
				b.WriteByte(s[i+1])
				i += 2
				continue
			}
			i++
			if c == '"' {
				closed = true
				break
			}
			b.WriteByte(c)
		}
		if !closed {
			return nil, false
		}
		toks = append(toks, b.String())
	}
	return toks, true
}
