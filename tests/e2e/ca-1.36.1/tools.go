//go:build tools

// Package tools pins the cluster-autoscaler command so `go mod tidy` keeps it.
package tools

import _ "k8s.io/autoscaler/cluster-autoscaler"
