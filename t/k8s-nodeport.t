#!/usr/bin/perl
# Servers from a NodePort Service (`"discover": {"nodeport": "NS/NAME"}`, a source with
# `discover=nodes,endpoints,services`): every node, on the node port of the Service port that
# is the listener's (two listeners, two node ports); with `externalTrafficPolicy: Local`, only
# the nodes running a ready pod of the Service. A listener port the Service has no port for is
# refused with a message; kubectl reads the Service from the fake API server.

use strict;
use warnings;
use Test::More;
use JSON::PP;
use IO::Socket::INET;
use Time::HiRes qw(time);
use Edge::Test qw(echo_name echo_serves);
use Edge::FakeKube;

my $t = Edge::Test->new;
my $dir = $t->dir;
my %ip = (a1 => '127.0.0.2', a2 => '127.0.0.3');
my ($tls, $http, $other) = map { $t->port($_) } qw(tls http other);
my ($np_tls, $np_http) = map { $t->port($_) } qw(np_tls np_http);
my $kube = Edge::FakeKube->new($t, 'a');
$kube->apply(Edge::FakeKube::node($_, $ip{$_})) for qw(a1 a2);
my $service = sub { Edge::FakeKube::service('kube-system', 'ingress', [[$tls, $np_tls], [$http, $np_http]], @_) };
$kube->apply($service->());
$kube->apply(Edge::FakeKube::endpointslice('kube-system', 'ingress-x', 'ingress', ['10.42.0.2', 'a2', ready => 'true']));
$kube->start;
# Each node answers "<node><port>" on its two node ports.
for my $n (sort keys %ip) {
    $t->backend("$n-tls", addr => $ip{$n}, port => $np_tls, mode => 'echo');
    $t->backend("$n-http", addr => $ip{$n}, port => $np_http, mode => 'echo');
}

$t->write_routes('routes.json', <<'EOF');
{"upstreams": {"ingress": {"discover": {"source": "cluster-a", "nodeport": "kube-system/ingress"}}},
 "routes": {"app.test": "ingress"}}
EOF
my $url = $kube->url;
$t->config(<<"EOF");
    edge_routes %%TESTDIR%%/routes.json;
    edge_routes_url $url name=cluster-a format=k8s discover=nodes,endpoints,services;
    edge_state %%TESTDIR%%/state;
    server { listen 127.0.0.1:%%PORT_tls%%; edge_route http; proxy_pass \$edge_upstream; }
    server { listen 127.0.0.1:%%PORT_http%%; edge_route http; proxy_pass \$edge_upstream; }
    server { listen 127.0.0.1:%%PORT_other%%; edge_route http; proxy_pass \$edge_upstream; }
EOF
$t->run;

my $who = sub { (echo_name($_[0], 'app.test'))[0] };
my $serves = sub { my ($port, @rest) = @_; echo_serves($port, 'app.test', @rest) };

$serves->($tls, 'a1-tls,a2-tls', "every node, on the Service's node port for the listener's port");
$serves->($http, 'a1-http,a2-http', 'and the other listener on the other node port');
is($who->($other), '', 'a listener port the Service has none for: closed');
$t->wait_for_log(qr/upstream "ingress" has no node port for the listener's port $other/);
pass('and said, with the client');

$kube->apply($service->(local => 1));
$serves->($tls, 'a2-tls', 'externalTrafficPolicy Local: only the node with a ready pod');

SKIP: {
    skip 'kubectl is not installed', 1 unless system('kubectl version --client >/dev/null 2>&1') == 0;
    my $json = `kubectl --server $url get services -n kube-system -o json 2>&1`;
    my $items = eval { decode_json($json)->{items} } // [];
    is($items->[0]{spec}{ports}[0]{nodePort}, $np_tls, 'kubectl reads the Service') or diag $json;
}
my @alerts = grep { /\[(alert|crit|emerg)\]/ } split /\n/, $t->read_file('error.log');
is_deeply(\@alerts, [], 'no alert in error.log');
done_testing;
