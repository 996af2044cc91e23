#!/usr/bin/perl
# Failover under load: concurrent clients while one of three servers is stopped. No client
# sees a failure (the edge retries past the refusing server), and once the server is marked
# down no connection is sent to it.

use strict;
use warnings;
use Test::More;
use POSIX ();
use Time::HiRes qw(time sleep);
use Edge::Test qw(http_get wait_for);

my $clients = 8;
my $t = Edge::Test->new;
my $dir = $t->dir;
$t->write_routes('routes.json', <<'EOF');
{
  "upstreams": {
    "load": {"servers": ["127.0.0.1:%%PORT_fa%%", "127.0.0.1:%%PORT_fb%%", "127.0.0.1:%%PORT_fc%%"],
             "max_fails": 1, "fail_timeout": "60s",
             "check": {"type": "tcp", "interval": "500ms", "fall": 2, "rise": 2}}
  },
  "routes": {"*.load.test": "load"}
}
EOF
$t->backend($_) for qw(fa fb fc);
$t->config(<<'EOF', workers => 2);
    edge_routes %%TESTDIR%%/routes.json;
    server { listen 127.0.0.1:%%PORT_edge%% reuseport backlog=1024; edge_route http;
             proxy_pass $edge_upstream; proxy_connect_timeout 5s; }
    server { listen 127.0.0.1:%%PORT_status%%; edge_status; }
EOF
$t->run;
my $edge = $t->port('edge');
my $status = $t->port('status');
my $fb = $t->port('fb');

# Each client loops on fresh connections, recording (id, start time, answer).
my @pids;
for my $n (1 .. $clients) {
    my $pid = fork() // die "fork: $!";
    if ($pid == 0) {
        open my $out, '>', "$dir/client$n.txt" or POSIX::_exit(1);
        my $seq = 0;
        until (-e "$dir/stop") {
            my $id = sprintf 'c%d-%d', $n, $seq++;
            my $start = time;
            my $answer = eval { http_get($edge, "$id.load.test") } // '';
            printf {$out} "%s %.6f %s\n", $id, $start, $answer;
        }
        close $out;
        POSIX::_exit(0);
    }
    push @pids, $pid;
}

my $count = sub { my $n = 0; for (1 .. $clients) { $n += () = $t->read_file("client$_.txt") =~ /\n/g } $n };
wait_for(sub { $count->() >= 200 }, 'load running');
$t->stop_backend('fb');
my $stopped = time;
wait_for(sub { (Edge::Test::server_state($status, 'load', "127.0.0.1:$fb") // {})->{down} }, 'fb marked down');
my $marked = time;
note(sprintf 'fb stopped -> marked down in %.2f s under load', $marked - $stopped);
# Enough connections started after the mark (the clients record each start time).
my $after_mark = sub {
    my $n = 0;
    for my $c (1 .. $clients) { $n += grep { ((split / /)[1] // 0) > $marked } split /\n/, $t->read_file("client$c.txt") }
    $n;
};
wait_for(sub { $after_mark->() >= 200 }, 'load after the mark', 120);
$t->write_file('stop', '');
waitpid($_, 0) for @pids;

my (%answer, %start);
for my $n (1 .. $clients) {
    for (split /\n/, $t->read_file("client$n.txt")) {
        my ($id, $start, $answer) = split / /, $_, 3;
        ($answer{$id}, $start{$id}) = ($answer // '', $start);
    }
}
my @failed = grep { $answer{$_} !~ /^f[abc]$/ } sort keys %answer;
cmp_ok(scalar keys %answer, '>=', 400, 'clients made ' . scalar(keys %answer) . ' connections');
# A connection fb had already accepted when it was stopped is cut (reset): once bytes went to
# an upstream, nginx cannot send them elsewhere. Each client has at most one such connection
# in flight; every one that started after fb was gone must be answered.
my @late = grep { $start{$_} >= $stopped } @failed;
ok(@late == 0 && @failed <= $clients, 'no client saw a failure but for one cut in flight each')
    or diag("failed: @failed[0 .. ($#failed < 9 ? $#failed : 9)]; after the stop: " . scalar(@late));

wait_for(sub { scalar(() = $t->read_file('access.log') =~ /load\.test/g) >= scalar keys %answer }, 'access log');
my %addr = $t->read_file('access.log') =~ /name=(\S+)\.load\.test .* addr=(.*?) status=/g;
my @after = grep { $start{$_} > $marked } keys %answer;
cmp_ok(scalar @after, '>=', 200, scalar(@after) . ' connections started after fb was marked down');
my @sent = grep { ($addr{$_} // '') =~ /:$fb\b/ } @after;
is(scalar @sent, 0, 'none of them was sent to fb') or diag("@sent[0 .. ($#sent < 9 ? $#sent : 9)]");
my @retried = grep { ($addr{$_} // '') =~ /:$fb, / } keys %answer;
note(scalar(@retried) . ' connections met fb refusing and were retried');
my %spread;
$spread{$answer{$_}}++ for @after;
is_deeply([sort keys %spread], ['fa', 'fc'], 'the other two servers share the load');

done_testing;
