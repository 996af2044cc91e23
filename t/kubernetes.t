#!/usr/bin/perl
# Routes from a Kubernetes API server (edge_routes_url format=k8s): list, then watch; a new
# Ingress routes without a reload, a deleted one stops; 410 Gone lists again; hosts keep their
# API's wildcard meaning; the last good table serves through an API that is down and comes
# back from disk when nginx starts while it is down; edge_status tells the source's state.

use strict;
use warnings;
use Test::More;
use Edge::Test qw(http_get wait_for);
use Edge::FakeKube;

my $t = Edge::Test->new;
my $kube = Edge::FakeKube->new($t, 'a', gateway => 1, bookmark => 1);
$kube->apply(Edge::FakeKube::ingress('web', 'shop', hosts => ['shop.test'], tls => ['shop.test'],
    ip => '10.0.0.5', class => 'nginx'));
# cert-manager's HTTP-01 solver repeats the host; a rule without host adds nothing.
$kube->apply(Edge::FakeKube::ingress('web', 'cm-acme-http-solver-x', hosts => ['shop.test'], norule => 1));
$kube->apply(Edge::FakeKube::ingress('apps', 'wild', hosts => ['*.apps.test']));
$kube->apply(Edge::FakeKube::route('HTTPRoute', 'gw', 'deep', '*.gw.test'));
$kube->start;

$t->write_routes('routes.json', <<'EOF');
{"upstreams": {"cluster-a": {"servers": ["127.0.0.1:%%PORT_a%%"]}}, "routes": {"static.test": "cluster-a"}}
EOF
my $url = $kube->url;
$t->config(<<"EOF", workers => 2);
    edge_routes %%TESTDIR%%/routes.json;
    edge_routes_url $url name=cluster-a format=k8s upstream=cluster-a interval=1s timeout=2s;
    edge_state %%TESTDIR%%/state;
    server { listen 127.0.0.1:%%PORT_edge%%; edge_route http; proxy_pass \$edge_upstream; }
    server { listen 127.0.0.1:%%PORT_status%%; edge_status; }
    server { listen 127.0.0.1:%%PORT_a%%; return "a"; }
EOF
$t->run;
my $edge = $t->port('edge');
my $routes = sub { my ($name, $want, $what) = @_;
    wait_for(sub { http_get($edge, $name) eq $want }, $what);
    pass($what);
};
my $status = sub { Edge::Test::status_json($t->port('status'))->{urls}[0] };

$routes->('shop.test', 'a', 'an Ingress host routes to upstream=');
$routes->('x.apps.test', 'a', 'an Ingress wildcard covers one label');
is(http_get($edge, 'y.x.apps.test'), '', 'but not two');
$routes->('y.x.gw.test', 'a', 'a Gateway API wildcard covers any depth');
is(http_get($edge, 'static.test'), 'a', 'the file source still routes');
# $edge_source names the source of each route: the URL source's name, the file's path.
my $dir = $t->dir;
wait_for(sub { $t->read_file('access.log') =~ /name=static\.test .* match=exact source=\Q$dir\E\/routes\.json$/m },
    'the file route logged with its source');
like($t->read_file('access.log'), qr/name=shop\.test route=shop\.test .* match=exact source=cluster-a$/m,
    '$edge_source: a route from a Kubernetes source');
like($t->read_file('access.log'), qr/name=x\.apps\.test route=\*\.apps\.test .* match=wildcard source=cluster-a$/m,
    '$edge_match: a wildcard');
wait_for(sub { ($status->()->{state} // '') eq 'watching' }, 'the source is watched');
my $st = $status->();
is($st->{objects}, 4, 'four objects read');
is($st->{repeated_hosts}, 1, "the solver's repeated host counted");
my ($tls) = grep { ($_->{kind} // '') eq 'TLSRoute' } @{$st->{resources}};
like($tls->{path}, qr{/apis/gateway\.networking\.k8s\.io/v1alpha2/tlsroutes$},
    'TLSRoute, not served at v1, is read at v1alpha2');

# --- Watch: a new Ingress routes, a deleted one stops, without a reload.
$kube->apply(Edge::FakeKube::ingress('web', 'blog', hosts => ['blog.test']));
$routes->('blog.test', 'a', 'a new Ingress routes (watch)');
$kube->delete(Edge::FakeKube::ingress('web', 'blog'));
$routes->('blog.test', '', 'a deleted Ingress stops routing');
wait_for(sub { ($status->()->{resources}[0]{resource_version} // 0) >= $kube->last_rv }, 'status has the resourceVersion');

# --- 410 Gone: the watch's resourceVersion was compacted away; the edge lists again.
my $lists = sub { scalar grep { $_->[1] =~ m{/ingresses\?limit=} } @{$kube->requests} };
my $before = $lists->();
$kube->compact;
$kube->stop;
$kube->apply(Edge::FakeKube::ingress('web', 'after', hosts => ['after.test']));
$kube->compact;
$kube->start;
$routes->('after.test', 'a', 'after 410 Gone, a new list brings the change');
ok($lists->() > $before, 'the ingresses were listed again');

# --- 410 as an ERROR event inside a 200 watch stream, as API servers also answer.
$before = $lists->();
$kube->stop;
$kube->{gone_as_event} = 1;
$kube->apply(Edge::FakeKube::ingress('web', 'event410', hosts => ['event410.test']));
$kube->compact;
$kube->start;
$routes->('event410.test', 'a', 'after an ERROR event with code 410, a new list brings the change');
ok($lists->() > $before, 'the ingresses were listed again');
$kube->{gone_as_event} = 0;

# --- API down: the last good table serves; the status says what is wrong.
# Every resource answers again first: a problem is logged once until the source answers on all
# of its resources, and one of them may still be waiting out the backoff of the stop above.
wait_for(sub { my $s = $status->(); !grep { defined $_->{error} } @{$s->{resources} // []} },
    'every resource answers again');
my $mark_down = length $t->read_file('error.log');
$kube->stop;
wait_for(sub { ($status->()->{last_error} // '') =~ /cannot connect|closed/ }, 'the error in status');
is(http_get($edge, 'shop.test'), 'a', 'the last good table keeps serving');
like($t->read_file('error.log'), qr/edge_routes_url cluster-a: .*the last good table keeps serving/,
    'the failure is logged');
# This outage's first line (the 410 tests above stopped the server too, and were logged).
wait_for(sub { substr($t->read_file('error.log'), $mark_down) =~ /edge_routes_url cluster-a: cannot connect/ },
    'the outage logged');
my $mark0 = length $t->read_file('error.log');
# Retries back off from 1 s: three seconds hold two or three of them, none logged again (unless
# the source answered in between, which is logged too).
sleep 3;
my $window = substr($t->read_file('error.log'), $mark0);
my $again = () = $window =~ /edge_routes_url cluster-a: cannot connect/g;
my $answered = () = $window =~ /edge_routes_url cluster-a: answers again/g;
ok($again <= $answered, "logged once, not at every retry ($again more, $answered returns)");

# --- nginx started while the API server is down: the routes come from the state folder.
$t->stop;
$t->run;
is(http_get($edge, 'shop.test'), 'a', 'restarted with the API down: routes from disk');
is(http_get($edge, 'after.test'), 'a', 'the last change too');
wait_for(sub { my $s = $status->(); $s->{state} ne 'starting' && ($s->{last_error} // '') =~ /cannot connect/ },
    'the new workers find the API down');
my $mark = length $t->read_file('error.log');
$kube->start;
$kube->apply(Edge::FakeKube::ingress('web', 'back', hosts => ['back.test']));
$routes->('back.test', 'a', 'the API back: changes flow again');
wait_for(sub { substr($t->read_file('error.log'), $mark) =~ /edge_routes_url cluster-a: answers again/ },
    'its return logged');
pass('its return is logged, once every resource answers');

unlike($t->read_file('error.log'), qr/\[(alert|crit|emerg)\]/, 'no alerts in error.log');
done_testing;
