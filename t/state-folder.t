#!/usr/bin/perl
# The state folder (edge_state) is a place anyone with the workers' user, or root, can write:
# nothing written there can crash a worker or change what it serves. Two nginx instances may
# share it (the default edge_state is the same for every instance on a host). Files left by
# processes that are gone are tidied away.

use strict;
use warnings;
use Test::More;
use Edge::Test qw(http_get wait_for);
use Edge::FakeKube;

my $routes = <<'EOF';
{"upstreams": {"a": {"servers": ["127.0.0.1:%%PORT_a%%"]}},
 "routes": {"a.test": "a", "%%NAME%%": "a"}}
EOF

# An edge with 2 workers on a shared state folder, with a route file and, if given, a URL
# source (a native document); returns it.
sub edge {
    my ($state, $url) = @_;
    my $t = Edge::Test->new;
    $t->write_routes('routes.json', $routes =~ s/%%NAME%%/one.test/r);
    my $source = $url ? "edge_routes_url $url name=doc format=edge interval=1s;" : '';
    $t->config(<<"EOF", workers => 2);
    edge_routes %%TESTDIR%%/routes.json;
    $source
    edge_state $state;
    server { listen 127.0.0.1:%%PORT_edge%% reuseport; edge_route http; proxy_pass \$edge_upstream; }
    server { listen 127.0.0.1:%%PORT_a%%; return "a"; }
EOF
    return $t;
}

# Waits until $name routes in every worker.
sub routes_everywhere {
    my ($t, $name) = @_;
    my $streak = 0;
    wait_for(sub { $streak = http_get($t->port('edge'), $name) eq 'a' ? $streak + 1 : 0; $streak >= 20 },
        "$name routes in every worker", 60);
}

sub workers { my ($t) = @_; return grep { kill 0, $_ } $t->read_file("error.log") =~ /start worker process (\d+)/g }

# Writes a route file with $name and waits until every live worker serves that table.
sub change {
    my ($t, $name) = @_;
    $t->write_routes('routes.json', $routes =~ s/%%NAME%%/$name/r);
    routes_everywhere($t, $name);
}

sub no_crash {
    my ($t, $what) = @_;
    unlike($t->read_file('error.log'), qr/exited on signal|\[(alert|crit|emerg)\]/, "$what: no worker crashed");
}

# --- Files left by processes that are gone (a temporary file of a dead writer, the images of
# an older version of the module) are removed; a live process's are not.
my $kube;
my $a = edge('%%TESTDIR%%/state', do {
    # A URL source: its candidate, accepted copy and status are in the state folder.
    my $u = Edge::Test->new;
    $kube = Edge::FakeKube->new($u, 'doc');
    $kube->{keep} = $u;
    $kube->url('/edge.json');
});
my $doc = sub {
    my ($name) = @_;
    $kube->set_document(qq({"upstreams": {"d": {"servers": ["127.0.0.1:@{[$a->port('a')]}"]}}, "routes": {"$name": "d"}}));
};
$doc->('u1.test');
$kube->start;
my $state = $a->dir . '/state';
mkdir $state;
my $dead = 2147483646;
my @stale = ("url-00000000000000aa.json.tmp$dead", "url-00000000000000aa.status.tmp$dead",
    'routes-00000000000000aa-3.img', 'routes-00000000000000aa-4.img.tmp');
$a->write_file("state/$_", 'left behind') for @stale;
utime time - 3600, time - 3600, map { "$state/$_" } @stale;
# The files of a URL source no configuration names (its URL changed): removed after a week
# untouched, kept before.
my @unused = ('url-00000000000000cc.json', 'url-00000000000000cc.status');
$a->write_file("state/$_", 'an old URL') for @unused, 'url-00000000000000dd.json';
utime time - 8 * 86400, time - 8 * 86400, map { "$state/$_" } @unused;
utime time - 86400, time - 86400, "$state/url-00000000000000dd.json";
push @stale, @unused;
my $live = "url-00000000000000bb.json.tmp$$";
$a->write_file("state/$live", 'being written');
$a->run;
change($a, 'two.test');
routes_everywhere($a, 'u1.test');
wait_for(sub { !grep { -e "$state/$_" } @stale }, 'stale files removed');
pass('temporary files of dead processes, old images and a week-old unknown source are removed');
ok(-e "$state/$live", "a live process's temporary file is left alone");
ok(-e "$state/url-00000000000000dd.json", 'an unknown source untouched for a day is kept');
unlink "$state/$live", "$state/url-00000000000000dd.json";

# --- Whatever is written to the state folder, in place or by truncation, changes nothing.
my @files = glob "$state/url-*";
ok(scalar(grep { /\.json$/ } @files) && scalar(grep { /\.next\.\d+$/ } @files),
    'the URL source\'s accepted copy and candidate are there: ' . join(' ', map { s{.*/}{}r } @files));
for my $file (glob "$state/*") {
    next unless -f $file;
    open my $fh, '+<', $file or next;
    my $size = -s $fh;
    print $fh map { chr int rand 256 } 1 .. $size;
    close $fh;
    truncate $file, 0;
}
change($a, 'three.test');
is(http_get($a->port('edge'), 'two.test'), '', 'the table before it is gone');
ok(http_get($a->port('edge'), 'u1.test') eq 'a', "the URL source's routes are still served");
$doc->('u2.test');
routes_everywhere($a, 'u2.test');
pass('the URL source changes again');
no_crash($a, 'files overwritten and truncated');

# --- FIFOs (whose open would never return) and links in place of the URL source's files:
# they are not read; nginx -t, a reload and a change all go on.
my ($accepted) = grep { /\.json$/ } glob "$state/url-*";
my ($candidate) = glob "$state/url-*.json.next.*";
unlink $accepted, $candidate;
system('mkfifo', $accepted) == 0 or die "mkfifo: $!";
symlink '/etc/passwd', $candidate or die "symlink: $!";
my ($ok, $out) = $a->test_config;
ok($ok, 'nginx -t returns and passes with a FIFO as a last good table') or diag $out;
$a->reload;
$doc->('u3.test');
routes_everywhere($a, 'u3.test');
pass('after a reload, the source writes its files again');
unlink $accepted if -p $accepted;
no_crash($a, 'FIFOs and links');

# --- A second nginx on the same state folder, and a worker of the first that restarts.
my $b = edge($state);
$b->run;
change($b, 'b.test');
change($a, 'four.test');
change($b, 'b2.test');
my ($leader) = $a->read_file('error.log') =~ /.*\[notice\] (\d+)#\d+: edge_routes: \S+: table \d+ loaded/s;
ok($leader, "the first edge's leader: $leader");
my ($follower) = grep { $_ != ($leader // 0) } workers($a);
ok($follower, "the first edge's follower: $follower");
kill 'KILL', $follower;
wait_for(sub { !kill 0, $follower }, 'the follower gone');
wait_for(sub { (() = workers($a)) == 2 }, 'the follower restarted');
my $streak = 0;
wait_for(sub { $streak = http_get($a->port('edge'), 'four.test') eq 'a' ? $streak + 1 : 0; $streak >= 20 },
    'the restarted worker serves the current table', 60);
pass('a restarted worker takes the current table although another nginx shares the folder');
change($a, 'five.test');
change($b, 'b3.test');
is(http_get($b->port('edge'), 'b2.test'), '', 'each edge serves its own table');
$b->stop;
$a->stop;

# --- Without /proc (where a follower finds the leader's table), followers read the source
# themselves: routing stays right in every worker.
SKIP: {
    skip 'needs root and unshare to hide /proc', 3
        unless $> == 0 && system('unshare --mount --propagation private true 2>/dev/null') == 0;
    my $c = edge('%%TESTDIR%%/state');
    my $nginx = $c->{binary};
    my $wrap = $c->write_file('nginx-without-proc',
        "#!/bin/sh\nexec unshare --mount --propagation private sh -c 'mount -t tmpfs none /proc && exec \"\$0\" \"\$@\"' $nginx \"\$@\"\n");
    chmod 0755, $wrap;
    $c->{binary} = $wrap;
    $c->run;
    change($c, 'six.test');
    change($c, 'seven.test');
    like($c->read_file('error.log'), qr/reads the source itself/, 'the fallback is logged');
    no_crash($c, 'without /proc');
}
done_testing;
