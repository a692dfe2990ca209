package iptsave

import (
	"reflect"
	"testing"
)

func TestLines(t *testing.T) {
	text := "-N DOCKER\r\n# Generated\n*nat\n:PREROUTING ACCEPT [0:0]\n-A PREROUTING -j X\nCOMMIT\n# after\n*raw\n-A PREROUTING -j Y\nCOMMIT"
	var got []string
	Lines(text, func(table, line string) { got = append(got, table+"|"+line) })
	want := []string{"|-N DOCKER", "|# Generated", "nat|:PREROUTING ACCEPT [0:0]", "nat|-A PREROUTING -j X", "|# after", "raw|-A PREROUTING -j Y"}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("Lines:\n got  %q\n want %q", got, want)
	}
}

func TestTokenize(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want []string
		ok   bool
	}{
		{`-p tcp -m comment --comment "berth 3f2a tcp 0.0.0.0:80->1.2.3.4:80" -j DNAT`, []string{"-p", "tcp", "-m", "comment", "--comment", "berth 3f2a tcp 0.0.0.0:80->1.2.3.4:80", "-j", "DNAT"}, true},
		{`--comment "a \"b\" c"`, []string{"--comment", `a "b" c`}, true},
		{"  a\tb  ", []string{"a", "b"}, true},
		{`--comment "open`, nil, false},
	} {
		got, ok := Tokenize(tc.in)
		if ok != tc.ok || !reflect.DeepEqual(got, tc.want) {
			t.Errorf("Tokenize(%q) = %q, %v; want %q, %v", tc.in, got, ok, tc.want, tc.ok)
		}
	}
}
