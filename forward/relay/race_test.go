//go:build race

package relay

// The race detector multiplies memory use, so memory budgets are not checked under it.
const raceEnabled = true
